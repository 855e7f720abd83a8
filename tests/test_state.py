"""Attention state in and out (issue 13): chaining calls equals one call, outputs and gradients,
gradients into the initial state, the bottom-right aligned call as a state, the decoder's state,
clear errors."""
import pytest
import torch
import torch.nn.functional as F

from performer_triton import AttentionState, favor_attention, gaussian_orthogonal_random_matrix, linear_attention
from performer_triton.attention_state import keys_state
from performer_triton.decoding import favor_state
from performer_triton.fast_attention import FastAttention
from conftest import DEVICE, HAS_TRITON
from kernel_cases import BUDGET

MAPS = {
    "softmax": dict(feature_map="softmax", key_stabilizer="prefix"),
    "relu": dict(feature_map="relu"),
    "softplus": dict(feature_map=torch.nn.Softplus()),
}


def qkv(b=2, h=3, n=257, d=12, e=7, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(b, h, n, dim, generator=g, dtype=torch.float64) for dim in (d, d, e))


def projection(m=20, d=12):
    return gaussian_orthogonal_random_matrix(m, d, generator=torch.Generator().manual_seed(1)).double()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def chained(q, k, v, P, cuts, **kw):
    """One call per piece between cuts, each starting from the previous one's final state."""
    outs, state = [], None
    bounds = [0, *cuts, q.shape[2]]
    for a, b in zip(bounds, bounds[1:]):
        out, state = favor_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], P, causal=True, initial_state=state,
                                     output_final_state=True, **kw)
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("chunk", [None, 8], ids=["chunk128", "chunk8"])
@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("cuts", [[1], [37, 128, 129, 200], [256]], ids=["1", "37-128-129-200", "256"])
def test_chained_calls_equal_one_call_with_gradients(monkeypatch, name, cuts, chunk):
    """Splitting the sequence anywhere (chunk boundaries of the PyTorch path included) and chaining
    the states gives the outputs, the final state and the gradients of one call; also with the
    PyTorch path's blocks of 8-row chunks, 8 to a block (states scanned inside a block)."""
    if chunk:
        from performer_triton import torch_backend

        monkeypatch.setattr(torch_backend, "CHUNK", chunk)
        monkeypatch.setattr(torch_backend, "FEATURE_TILE", 64 * 6 * 20)  # 64-row blocks at b h = 6, m = 20
    kw = MAPS[name]
    q, k, v = qkv(scale=2.0)
    P = projection()
    g = torch.randn(2, 3, 257, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ones = tuple(t.clone().requires_grad_() for t in (q, k, v))
    whole, whole_state = favor_attention(*ones, P, causal=True, output_final_state=True, **kw)
    whole.backward(g)
    parts = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out, state = chained(*parts, P, cuts, **kw)
    out.backward(g)
    assert rel(out, whole) <= 1e-12
    for a, b in zip(state, whole_state):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)) and torch.allclose(a[finite], b[finite], rtol=1e-11, atol=1e-14)
    for a, b in zip(parts, ones):
        assert rel(a.grad, b.grad) <= 1e-11
    # without a state the result is the plain call's (global and prefix agree with no later keys)
    plain = favor_attention(q, k, v, P, causal=True, **kw)
    assert rel(whole.detach(), plain) <= 1e-12


@pytest.mark.parametrize("name", ["softmax", "relu"])
def test_a_state_of_keys_without_value_columns(name):
    """Values with e = 0 (1.1.4's FastAttention takes them): empty outputs, and a state that is the
    key count column of the same keys' state with values, its gradients included."""
    q, k, v = qkv(n=37)
    P = projection()
    k0, k7 = (k.clone().requires_grad_() for _ in range(2))
    states = []
    for keys, values in ((k0, v[..., :0]), (k7, v)):
        out, state = chained(q, keys, values, P, [20], **MAPS[name])
        assert out.shape == (2, 3, 37, values.shape[-1])
        states.append(state)
    (s0, s7) = states
    assert torch.allclose(s0.hz, s7.hz[..., -1:], rtol=1e-12, atol=0) and torch.equal(s0.v_sum, s7.v_sum[..., -1:])
    s0.hz.sum().backward()
    s7.hz[..., -1].sum().backward()
    assert rel(k0.grad, k7.grad) <= 1e-12


def test_final_state_gradients_reach_keys_values_and_the_initial_state():
    """A loss on the final state alone (truncated backpropagation through time) differentiates
    through the keys, the values and the initial state; float64 finite differences (relu: no
    stabilizer, so the function is smooth where no projection is 0)."""
    q, k, v = qkv(b=1, h=2, n=9, d=6, e=4)
    P = projection(8, 6)
    _, s0 = favor_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], P, causal=True, feature_map="relu",
                            output_final_state=True)

    def f(k1, v1, hz0, vs0):
        out, s1 = favor_attention(q[:, :, 5:], k1, v1, P, causal=True, feature_map="relu",
                                  initial_state=AttentionState(hz0, vs0, s0.ref, s0.stab), output_final_state=True)
        return out, s1.hz, s1.v_sum

    inputs = tuple(t.clone().requires_grad_() for t in (k[:, :, 5:], v[:, :, 5:], s0.hz, s0.v_sum))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_second_order_gradients_with_a_state():
    """create_graph through attention with a state (the backward again as plain operations):
    gradgradcheck in float64 through q, the keys, the values and the initial state, relu features
    (smooth where no projection is 0; the softmax stabilizer is a constant of the first order)."""
    q, k, v = qkv(b=1, h=2, n=9, d=6, e=4)
    P = projection(8, 6)
    _, s0 = favor_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], P, causal=True, feature_map="relu",
                            output_final_state=True)

    def f(q1, k1, v1, hz0, vs0):
        out, s1 = favor_attention(q1, k1, v1, P, causal=True, feature_map="relu",
                                  initial_state=AttentionState(hz0, vs0, s0.ref, s0.stab), output_final_state=True)
        return out, s1.hz, s1.v_sum

    inputs = tuple(t.clone().requires_grad_() for t in (q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], s0.hz, s0.v_sum))
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("n", [0, 1, 37, 257])
def test_keys_state_is_the_final_state_without_queries(name, n):
    """keys_state(k, v) equals the final state favor_attention computes along with its outputs,
    values and gradients of a loss on the state (float64, awkward lengths, large keys that need
    the reference); it chains as that state does."""

    q, k, v = qkv(b=2, h=3, n=n, d=12, e=7, scale=2.0)
    P = projection(20, 12)
    g = torch.Generator().manual_seed(9)
    w_hz, w_vs = torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, generator=g,
                                                                                        dtype=torch.float64)
    got_leaves = [t.clone().requires_grad_() for t in (k, v)]
    got = keys_state(*got_leaves, P, feature_map=MAPS[name]["feature_map"])
    want_leaves = [t.clone().requires_grad_() for t in (k, v)]
    _, want = favor_attention(q, *want_leaves, P, causal=True, output_final_state=True, **MAPS[name])
    for what, a, b in zip(AttentionState._fields, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, what)
        if what in ("hz", "v_sum"):
            assert rel(a, b) < 1e-12 and torch.isfinite(a).all(), (name, what)
        else:  # the reference and the stabilizer: the same maxima (-inf without keys)
            assert torch.allclose(a, b, rtol=1e-13, atol=0) or torch.equal(a, b), (name, what)
    if n:
        for state, leaves in ((got, got_leaves), (want, want_leaves)):
            ((state.hz * w_hz).sum() + (state.v_sum * w_vs).sum()).backward()
        for a, b in zip(got_leaves, want_leaves):
            assert rel(a.grad, b.grad) < 1e-12, name
        # second order (create_graph through keys_state's backward): a loss on the keys' gradient
        second = []
        for make in (lambda k1, v1: keys_state(k1, v1, P, feature_map=MAPS[name]["feature_map"]),
                     lambda k1, v1: favor_attention(q, k1, v1, P, causal=True, output_final_state=True,
                                                    **MAPS[name])[1]):
            leaves = [t.clone().requires_grad_() for t in (k, v)]
            (dk,) = torch.autograd.grad((make(*leaves).hz * w_hz).square().sum(), leaves[0], create_graph=True)
            second.append(torch.autograd.grad(dk.square().sum(), leaves))
        for a, b in zip(*second):
            assert rel(a, b) < 1e-10, name
    if n > 5:  # the rest of the sequence from the state of its first 5 keys: the outputs of one call
        state = keys_state(k[:, :, :5], v[:, :, :5], P, feature_map=MAPS[name]["feature_map"])
        rest = favor_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], P, causal=True, initial_state=state, **MAPS[name])
        whole = favor_attention(q, k, v, P, causal=True, **MAPS[name])
        assert rel(rest, whole[:, :, 5:]) < 1e-12, name


def test_linear_attention_state_gradcheck():
    """Given features: the state's every gradient against finite differences."""
    g = torch.Generator().manual_seed(3)
    qf, kf = (torch.rand(1, 2, 7, 5, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v = torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64)
    _, s0 = linear_attention(qf[:, :, :3], kf[:, :, :3], v[:, :, :3], causal=True, output_final_state=True)

    def f(qf1, kf1, v1, hz0, vs0):
        out, s1 = linear_attention(qf1, kf1, v1, causal=True, initial_state=(hz0, vs0, s0.ref, s0.stab),
                                   output_final_state=True)
        return out, s1.hz, s1.v_sum

    inputs = tuple(t.clone().requires_grad_() for t in (qf[:, :, 3:], kf[:, :, 3:], v[:, :, 3:], s0.hz, s0.v_sum))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "relu"])
def test_a_longer_key_prefix_equals_its_keys_as_a_state(name):
    """Causal with n queries and s > n keys (bottom-right aligned) equals passing the first s - n
    keys as a state; the decoder's state after those keys is the same state."""
    kw = MAPS[name]
    q, k, v = qkv(n=40)
    P = projection()
    out = favor_attention(q[:, :, 30:], k, v, P, causal=True, **kw)
    _, state = favor_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], P, causal=True, output_final_state=True,
                               **kw)
    chained_out = favor_attention(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], P, causal=True, initial_state=state, **kw)
    assert rel(chained_out, out) <= 1e-12
    fa = FastAttention(12, 20, causal=True, generalized_attention=name == "relu",
                       key_stabilizer="prefix" if name == "softmax" else "global").double()
    fa.projection_matrix.copy_(P)
    decoder = favor_state(fa, k, v)
    decoder.extend(k[:, :, :30], v[:, :, :30])
    for a, b in zip((decoder.hz, decoder.v_sum, decoder.ref, decoder.stab), state):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)) and torch.allclose(a[finite], b[finite], rtol=1e-12)


def test_state_of_16_bit_inputs_is_fp32_and_chains():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(n=70, scale=3.0))
    P = projection()
    out, state = favor_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], P, causal=True, key_stabilizer="prefix",
                                 output_final_state=True)
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in state)
    rest = favor_attention(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], P, causal=True, key_stabilizer="prefix",
                           initial_state=state)
    whole = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix")
    assert rel(rest.float(), whole[:, :, 40:].float()) <= 1e-2
    # the final state comes in the call's compute dtype with keys and without (a float64 state
    # given to a 16-bit or fp32 call: fp32 either way; it came back float64 without keys)
    wide = AttentionState(*(t.double().requires_grad_(t.is_floating_point()) for t in state))
    for dtype in (torch.bfloat16, torch.float32):
        for n in (0, 5):
            _, final = favor_attention(q[:, :, :n].to(dtype), k[:, :, :n].to(dtype), v[:, :, :n].to(dtype), P,
                                       causal=True, key_stabilizer="prefix", initial_state=wide,
                                       output_final_state=True)
            assert all(t.dtype == torch.float32 for t in final), (dtype, n)
            assert torch.autograd.grad(final.hz.sum(), wide.hz)[0].dtype == torch.float64


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))], ids=["pytorch", "fused"])
def test_state_under_torch_compile_with_backward(fused):
    """A compiled training step (fullgraph) from a state, rearranged (non-contiguous) inputs, a
    loss on the output and the final state, gradients into the initial state: the eager results
    (fused: fp16 on the kernels, forward and backward)."""
    dtype = torch.float16 if fused else torch.float32
    q, k, v = (rearranged(t.to(dtype)) for t in qkv(n=50))
    P = projection().to(dtype)
    backend = "triton" if fused else "auto"

    def step(q, k, v, state):
        out, state = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=state,
                                     output_final_state=True, backend=backend)
        return out.float().square().sum() + state.hz.sum() + state.v_sum.square().sum(), state

    _, s0 = favor_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], P, causal=True, key_stabilizer="prefix",
                            output_final_state=True)
    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v, s0.hz, s0.v_sum))
        loss, _ = fn(*(t[:, :, 20:] for t in leaves[:3]), s0._replace(hz=leaves[3], v_sum=leaves[4]))
        loss.backward()
        grads.append([loss.detach()] + [t.grad.float() for t in leaves])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and rel(a, b) <= 1e-4


def test_bad_state_arguments_are_refused():
    # AttentionState.empty names its argument (torch.zeros failed inside)
    for args, kwargs, error, text in (((-1, 2, 3, 4), {}, ValueError, "b must be >= 0, got -1"),
                                      ((1, 1.5, 3, 4), {}, TypeError, "h must be an int, got float"),
                                      ((1, 2, 3, 4), dict(dtype=torch.int32), TypeError, "dtype must be a floating")):
        with pytest.raises(error, match=text):
            AttentionState.empty(*args, **kwargs)
    assert AttentionState.empty(1, 2, 3, 0).hz.shape == (1, 2, 3, 1)  # (keys without value columns)
    q, k, v = qkv(n=10)
    P = projection()
    _, state = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)
    with pytest.raises(ValueError, match="causal attention only"):
        favor_attention(q, k, v, P, initial_state=state)
    with pytest.raises(ValueError, match="key_stabilizer='prefix'"):
        favor_attention(q, k, v, P, causal=True, output_final_state=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=state,
                        key_padding_mask=torch.ones(2, 10, dtype=torch.bool))
    for n in (10, 0):  # (no keys: refused all the same, not by what the keys hold)
        with pytest.raises(ValueError, match="no_projection.*no state"):
            favor_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], None, causal=True, feature_map="none",
                            output_final_state=True)
    with pytest.raises(ValueError, match=r"initial_state.hz must have shape \(2, 3, 20, 8\)"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=state._replace(
            hz=state.hz[..., :5]))
    with pytest.raises(TypeError, match="AttentionState"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=state.hz)
    with pytest.raises(ValueError, match=r"projection_matrix must have shape \(nb_features, 12\) to match the head dim of k, got \(20, 3\)"):
        keys_state(k, v, P[:, :3])
    with pytest.raises(ValueError, match="backend='triton' cannot run here: .*float64"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=state, backend="triton")
    with pytest.raises(ValueError, match="causal attention only"):
        linear_attention(F.relu(q), F.relu(k), v, output_final_state=True)


def test_final_states_and_the_decoder_never_alias_the_callers_state():
    """The final state of a call without keys is a copy of the initial one, and a decoder loads
    copies: its fused step updates its state in place, which would rewrite the caller's."""
    q, k, v = qkv(n=10)
    P = projection()
    _, state = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)
    _, after = favor_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], P, causal=True, key_stabilizer="prefix",
                               initial_state=state, output_final_state=True)
    decoder = favor_state(FastAttention(12, 20, causal=True, key_stabilizer="prefix").double(), k, v)
    decoder.load(state)
    for made in (after, decoder.state):
        assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(made, state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_features_made_in_pytorch_are_fp32_with_a_state(dtype):
    """A kernel_fn's features are made in fp32 from 16-bit rows on every path (as favor_attention
    without a state makes them): the state, the outputs and the decoder's state are those of the
    same rows in fp32, bit for bit (16-bit features rounded every key's contribution)."""
    q, k, v = (t.float() for t in qkv(n=37))
    P = projection().float()
    low = [t.to(dtype) for t in (q, k, v)]
    kw = dict(causal=True, feature_map=torch.nn.Softplus(), output_final_state=True)
    out_low, state_low = favor_attention(*low, P, **kw)
    out_f32, state_f32 = favor_attention(*(t.float() for t in low), P, **kw)
    assert out_low.dtype == dtype and torch.equal(out_low, out_f32.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(state_low, state_f32))
    fa = FastAttention(12, 20, causal=True, generalized_attention=True, kernel_fn=torch.nn.Softplus())
    decoders = [favor_state(fa, *rows[1:]) for rows in (low, [t.float() for t in low])]
    for decoder, rows in zip(decoders, (low, [t.float() for t in low])):
        decoder.extend(rows[1][:, :, :5], rows[2][:, :, :5])
        decoder.step(*(t[:, :, 5:9] for t in rows))
    assert all(torch.equal(a, b) for a, b in zip(decoders[0].state, decoders[1].state))


def test_a_state_of_the_other_map_kind_is_refused():
    """A state holding keys records whether softmax features made it (a finite stabilizer):
    continuing it with relu or given features, or the other way round, would mix two attentions.
    Empty states fit every map."""
    q, k, v = qkv(n=10)
    P = projection()
    kw = dict(causal=True, key_stabilizer="prefix")
    _, soft = favor_attention(q, k, v, P, output_final_state=True, **kw)
    _, relu = favor_attention(q, k, v, P, feature_map="relu", output_final_state=True, **kw)
    for made, used in ((soft, dict(feature_map="relu")), (soft, dict(feature_map=torch.nn.Softplus())),
                       (relu, dict(feature_map="softmax"))):
        with pytest.raises(ValueError, match="initial_state was made with"):
            favor_attention(q, k, v, P, initial_state=made, **kw | used)
    with pytest.raises(ValueError, match="initial_state was made with softmax"):
        linear_attention(F.relu(q @ P.mT), F.relu(k @ P.mT), v, causal=True, initial_state=soft)
    decoder = favor_state(FastAttention(12, 20, causal=True, generalized_attention=True).double(), k, v)
    with pytest.raises(ValueError, match="initial_state was made with softmax"):
        decoder.load(soft)
    empty = AttentionState.empty(2, 3, 20, 7, dtype=torch.float64)
    for used in (dict(feature_map="relu"), dict(feature_map="softmax")):
        favor_attention(q, k, v, P, initial_state=empty, **kw | used)


def test_a_decoding_cache_refuses_a_redrawn_projection():
    """A cache filled before a projection redraw holds keys of the old features: the next cached
    call raises (training mode counts every call towards feature_redraw_interval); without a
    redraw (eval mode) the cache is exact."""
    from performer_triton import PerformerLM
    from performer_triton.decoding import DecodingCache

    seq = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=30, max_seq_len=40, dim=24, depth=2, heads=3, dim_head=8, causal=True,
                        key_stabilizer="prefix", feature_redraw_interval=2).double()
    cache = DecodingCache()
    model.train()(seq[:, :5], cache=cache)
    model(seq[:, 5:6], cache=cache)
    with pytest.raises(ValueError, match="redrawn"):
        model(seq[:, 6:7], cache=cache)
    model.eval()
    cache = DecodingCache()
    steps = [model(seq[:, :5], cache=cache)] + [model(seq[:, i : i + 1], cache=cache) for i in range(5, 10)]
    assert rel(torch.cat(steps, 1), model(seq)) <= 1e-12


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))], ids=["pytorch", "fused"])
def test_state_ops_pass_opcheck(use_triton):
    """The stateful custom op on both paths (fused: fp16, the kernels' saved key states as a list
    output): schema, fake tensors (shapes, strides), autograd registration."""
    from performer_triton.ops import favor_state_fwd

    dtype = torch.float16 if use_triton else torch.float32
    q, k, v = (t.to(dtype) for t in qkv(b=1, h=2, n=9, d=6, e=4))
    P = projection(8, 6).to(dtype)
    _, s0 = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)
    args = (*(t.clone().requires_grad_() for t in (q, k, v)), P, 0, True, 1e-6,
            s0.hz.clone().requires_grad_(), s0.v_sum.clone().requires_grad_(), s0.ref, s0.stab, use_triton)
    torch.library.opcheck(favor_state_fwd, args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_eager_state_calls_match_the_state_op():
    """Eager fused calls (ops.favor_with_state: no torch.library dispatch) give the custom op's
    outputs, final state and gradients (of q, k, v and of the initial state) bit for bit."""
    from performer_triton import ops

    q, k, v = (t.to(DEVICE, torch.float16) for t in qkv(b=1, h=2, n=37, d=6, e=4))  # states: 16-bit only
    P = projection(8, 6).to(DEVICE, torch.float16)
    _, s0 = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(t.shape, generator=gen).to(t.device, t.dtype) for t in (v, s0.hz, s0.v_sum)]
    results = []
    for fn in (ops.favor_with_state, ops.favor_state_fwd):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, s0.hz, s0.v_sum)]
        outs = fn(*leaves[:3], P, 0, True, 1e-6, *leaves[3:], s0.ref, s0.stab, True)
        loss = (outs[0] * weights[0]).sum() + (outs[5] * weights[1]).sum() + (outs[6] * weights[2]).sum()
        loss.backward()
        assert (type(outs[0].grad_fn).__name__ == "_EagerBackward") == (fn is ops.favor_with_state)
        results.append([t.detach() for t in (*outs[:9], *outs[9])] + [t.grad for t in leaves])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert a.shape == b.shape and torch.equal(a, b)


def test_the_decoder_continues_from_a_prefill_state():
    """A prompt run once through favor_attention(output_final_state=True) seeds the decoder, which
    then gives the outputs of one call over prompt and continuation."""
    q, k, v = qkv(n=30)
    fa = FastAttention(12, 20, causal=True, key_stabilizer="prefix").double()
    P = fa.projection_matrix
    _, state = favor_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], P, causal=True, key_stabilizer="prefix",
                               output_final_state=True)
    decoder = favor_state(fa, k, v)
    decoder.load(state)
    outs = decoder.step(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:])
    whole = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix")
    assert rel(outs, whole[:, :, 20:]) <= 1e-12
    assert all(torch.equal(a, b) for a, b in zip(decoder.state, (decoder.hz, decoder.v_sum, decoder.ref, decoder.stab)))


def _state_call(q, k, v, P, state, backend, kw, weights):
    """One favor_attention call from state as a training step would make it: a loss on the output
    and on both parts of the final state.  -> (out, final state, gradients of q, k, v and of the
    state's hz, v_sum)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    state = AttentionState(state.hz.clone().requires_grad_(), state.v_sum.clone().requires_grad_(), state.ref,
                           state.stab)
    leaves += [state.hz, state.v_sum]
    out, final = favor_attention(*leaves[:3], P, causal=True, initial_state=state, output_final_state=True,
                                 backend=backend, **kw)
    g, w_hz, w_vs = weights
    loss = (out * g.to(out.dtype)).sum() + (final.hz * w_hz.to(final.hz.dtype)).sum()
    (loss + (final.v_sum * w_vs.to(final.v_sum.dtype)).sum()).backward()
    return out, final, [t.grad for t in leaves]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["softmax", "relu"])
# one partial chunk from an empty state (R0 = M0 = -inf: gradient 0); two chunks (an even walk);
# four (odd)
@pytest.mark.parametrize("n", [37, 128, 200])
def test_fused_forward_and_backward_from_a_state(name, dtype, n):
    """The fused causal kernels from a state, forward and backward (a loss on the output and on
    both parts of the final state), against float64 on the same 16-bit values: outputs, final
    state, gradients of q, k, v and of the initial state; NaN-filled outputs (conftest)."""
    kw = MAPS[name]
    start = 0 if n == 37 else 40
    q, k, v = (t.to(dtype) for t in qkv(n=n + start))
    P = projection().to(dtype)
    gen = torch.Generator().manual_seed(4)
    # no loss on the final v_sum at n = 128: d v_sum0 is then the eps part alone, not the loss's
    # own weights passed through
    weights = (torch.randn(2, 3, n, 7, generator=gen), torch.randn(2, 3, 20, 8, generator=gen),
               torch.randn(2, 3, 8, generator=gen) * (n != 128))
    runs = {}
    for backend, cast in (("triton", lambda t: t.to(DEVICE)), ("torch", lambda t: t.double())):
        state = AttentionState.empty(2, 3, 20, 7, dtype=cast(torch.ones(())).dtype, device=cast(q).device)
        if start:
            _, state = favor_attention(*(cast(t[:, :, :start]) for t in (q, k, v)), cast(P), causal=True,
                                       output_final_state=True, backend="torch", **kw)
        runs[backend] = _state_call(*(cast(t[:, :, start:]) for t in (q, k, v)), cast(P), state, backend, kw,
                                    tuple(cast(w) for w in weights))
    (out, final, grads), (out64, final64, grads64) = runs["triton"], runs["torch"]
    budget = BUDGET[dtype]
    assert out.dtype == dtype and final.hz.dtype == torch.float32
    assert rel(out.double().cpu(), out64) <= budget
    for a, b in zip(final, final64):
        a, finite = a.double().cpu(), torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        assert (a - b)[finite].norm() <= budget * max(b[finite].norm().item(), 1.0)  # relu: R = 0
    for a, b in zip(grads, grads64):
        assert rel(a.double().cpu(), b) <= budget


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", ["softmax", "relu"])
def test_states_mean_the_same_on_every_path(name):
    """A state the fused kernels return continues on the PyTorch path (and the other way) as one
    call over both pieces does: the kernels' relu units carry the feature eps, the state's do not
    (small keys, where a doubled eps would be a 2 % error)."""
    kw = MAPS[name]
    q, k, v = (t.half() for t in qkv(n=100, scale=0.2))
    P = projection().half()
    whole = favor_attention(q.double(), k.double(), v.double(), P.double(), causal=True, **kw)
    for first, second in (("triton", "torch"), ("torch", "triton")):
        x1 = [t[:, :, :60].to(DEVICE) for t in (q, k, v)]
        out1, state = favor_attention(*x1, P.to(DEVICE), causal=True, output_final_state=True, backend=first, **kw)
        x2 = [t[:, :, 60:].to(DEVICE) for t in (q, k, v)]
        out2 = favor_attention(*x2, P.to(DEVICE), causal=True, initial_state=state, backend=second, **kw)
        assert rel(torch.cat([out1, out2], 2).double().cpu(), whole) <= BUDGET[torch.float16], (first, second)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_states_the_kernels_do_not_take_run_on_the_pytorch_path(monkeypatch):
    """fp32, given features and heads wider than 64 with a state: backend="triton" says why,
    backend="auto" runs the PyTorch path: asked as on CUDA (where the kernels take the rows, "auto"
    decides as "triton"), its outputs and final states are backend="torch"'s bit for bit (on a CPU
    "auto" never reaches that fallback: a deleted fallback went unnoticed, review R15)."""
    from performer_triton import functional

    q, k, v = (t.float().to(DEVICE) for t in qkv(n=20))
    P = projection().float().to(DEVICE)
    monkeypatch.setattr(functional, "AUTO_DEVICES", ("cuda", "cpu"))  # "auto" decides here as on CUDA
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # (fp32 too)
    wide = torch.randn(2, 3, 20, 72, dtype=torch.float16, device=DEVICE)
    for args, kw in (((q, k, v, P), dict(key_stabilizer="prefix")),
                     ((q.half(), k.half(), v.half(), P.half()), dict(feature_map=torch.nn.Softplus())),
                     ((q.half(), k.half(), wide, P.half()), dict(key_stabilizer="prefix"))):
        outs = [favor_attention(*args, causal=True, output_final_state=True, backend=backend, **kw)
                for backend in ("auto", "torch")]
        assert torch.equal(outs[0][0], outs[1][0]) and all(map(torch.equal, outs[0][1], outs[1][1])), kw
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True, backend="triton")
    with pytest.raises(ValueError, match="own feature maps"):
        favor_attention(q.half(), k.half(), v.half(), P.half(), causal=True, feature_map=torch.nn.Softplus(),
                        output_final_state=True, backend="triton")
    wide = torch.randn(2, 3, 20, 72, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 64, got 72"):
        favor_attention(q.half(), k.half(), wide, P.half(), causal=True, key_stabilizer="prefix",
                        output_final_state=True, backend="triton")


# packed variable-length batches (cu_seqlens)

LENGTHS = [1, 63, 64, 65, 300]


def packed(lengths=LENGTHS, d=12, e=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(6)
    total = sum(lengths)
    q, k, v = (torch.randn(1, 2, total, x, generator=g, dtype=torch.float64).to(dtype) for x in (d, d, e))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("case", [dict(causal=False), dict(causal=True), dict(causal=True, key_stabilizer="prefix")],
                         ids=["noncausal", "causal-global", "causal-prefix"])
@pytest.mark.parametrize("feature_map", ["softmax", "relu"])
def test_packed_sequences_equal_each_sequence_alone(case, feature_map):
    """Lengths 1, 63, 64, 65, 300 in one pack: outputs and gradients of each sequence alone (its
    own stabilizers), the pack's own empty-free offsets."""
    q, k, v, cu = packed()
    P = projection()
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out = favor_attention(*leaves, P, feature_map=feature_map, cu_seqlens=cu, **case)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(g)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        alone = tuple(t[:, :, a:b].clone().requires_grad_() for t in (q, k, v))
        ref = favor_attention(*alone, P, feature_map=feature_map, **case)
        ref.backward(g[:, :, a:b])
        assert rel(out[:, :, a:b], ref) <= 1e-12
        for x, y in zip(leaves, alone):  # absolute floor: one key has dq = dk = 0 exactly
            assert (x.grad[:, :, a:b] - y.grad).norm() <= 1e-11 * max(y.grad.norm().item(), 1.0)


def test_packed_sequences_with_per_sequence_states():
    """Initial and final states per sequence (an empty sequence keeps its state)."""
    lengths = [5, 0, 40]
    q, k, v, cu = packed(lengths)
    P = projection()
    kw = dict(causal=True, key_stabilizer="prefix")
    _, s0 = favor_attention(*packed([7, 7, 7])[:3], P, cu_seqlens=packed([7, 7, 7])[3], output_final_state=True, **kw)
    out, s1 = favor_attention(q, k, v, P, cu_seqlens=cu, initial_state=s0, output_final_state=True, **kw)
    assert out.shape == (1, 2, 45, 7) and s1.hz.shape[0] == 3
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        state = AttentionState(*(t[i : i + 1] for t in s0))
        ref, ref_state = favor_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], P, initial_state=state,
                                         output_final_state=True, **kw)
        if b > a:
            assert rel(out[:, :, a:b], ref) <= 1e-12
        for x, y in zip(s1, ref_state):
            assert torch.equal(torch.isfinite(x[i : i + 1]), torch.isfinite(y))
            assert torch.allclose(x[i : i + 1][torch.isfinite(y)], y[torch.isfinite(y)], rtol=1e-12)


def rearranged(t):
    """t (1, h, n, x) as the (1, h, n, x) view of a (1, n, h, x) tensor: the layout a model's
    rearrange of its packed (total, h * x) projections gives."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", [dict(causal=True, key_stabilizer="prefix"), dict(causal=False)],
                         ids=["causal-prefix", "noncausal"])  # (the global stabilizer: test_kernels_causal)
def test_packed_sequences_on_the_kernels(case):
    """Packs run as one fused forward and backward (offsets left on the device): each sequence's
    outputs and gradients are the PyTorch path's, within the fp16 budget; a NaN value in one
    sequence reaches no other.  (fp16: the interpreter's bf16 arithmetic finds NaN - NaN == 0.)"""
    q, k, v, cu = (rearranged(t) if t.dim() == 4 else t for t in packed(dtype=torch.float16))
    v = v.clone()
    v[:, :, 100] = float("nan")  # in the third sequence, [64, 128)
    P = projection().to(torch.float16)
    g = torch.randn(q.shape[:3] + (7,), generator=torch.Generator().manual_seed(8)).to(torch.float16)
    results = []
    for backend in ("triton", "torch"):
        leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
        out = favor_attention(*leaves, P, cu_seqlens=cu, backend=backend, **case)
        (out.float() * g.float()).sum().backward()
        results.append((out.float(), *(t.grad.float() for t in leaves)))
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if i == 2:  # causal: the outputs before the NaN are finite
            first = 100 if case["causal"] else a
            assert torch.isfinite(results[0][0][:, :, a:first]).all() and torch.isnan(results[0][0][:, :, first:b]).all()
            continue
        for name, x, y in zip(("out", "dq", "dk", "dv"), *results):
            x, y = x[:, :, a:b], y[:, :, a:b]
            assert torch.isfinite(x).all(), (name, a, b)
            if b - a == 1 and name in ("dq", "dk"):  # n = 1: the residue of g.v - g.out (test_kernels_causal)
                continue
            assert (x - y).norm() <= BUDGET[torch.float16] * max(y.norm().item(), 1e-3), (name, a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("start", ["states", "empty"])
@pytest.mark.parametrize("name,dtype", [("softmax", torch.float16), ("relu", torch.bfloat16)], ids=str)
def test_packed_sequences_with_states_on_the_kernels(monkeypatch, name, dtype, start):
    """A pack with a state per sequence in one fused forward and backward (no per-sequence loop):
    rearranged 16-bit inputs, an empty sequence (keeps its state: a given one, or the empty state,
    whose -inf references once made its final hz NaN), a loss on the output and both parts of the
    final states; against float64 one sequence at a time on the PyTorch path."""
    import performer_triton.functional as functional

    kw = MAPS[name]
    q, k, v, cu = (rearranged(t) if t.dim() == 4 else t for t in packed([5, 0, 70, 64], dtype=dtype))
    P = projection().to(dtype)
    first = packed([7, 7, 7, 7])
    _, s0 = favor_attention(*(t.to(dtype).double() for t in first[:3]), P.double(), cu_seqlens=first[3], causal=True,
                            output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(8)
    weights = (torch.randn(1, 2, 139, 7, generator=gen), torch.randn(4, 2, 20, 8, generator=gen),
               torch.randn(4, 2, 8, generator=gen))
    runs = []
    for backend, cast in (("triton", lambda t: t.float() if t.dtype == torch.float64 else t), ("torch", torch.Tensor.double)):
        leaves = [cast(t).detach().clone().requires_grad_() for t in (q, k, v, s0.hz, s0.v_sum)]
        state = AttentionState(leaves[3], leaves[4], cast(s0.ref), cast(s0.stab)) if start == "states" else None
        with monkeypatch.context() as patch:
            if backend == "triton":
                patch.setattr(functional, "_packed", lambda *a: pytest.fail("the pack ran one sequence at a time"))
            out, final = favor_attention(*leaves[:3], cast(P), causal=True, cu_seqlens=cu, initial_state=state,
                                         output_final_state=True, backend=backend, **kw)
        loss = (out.double() * weights[0]).sum() + (final.hz.double() * weights[1]).sum()
        (loss + (final.v_sum.double() * weights[2]).sum()).backward()
        runs.append((out, final, [t.grad for t in leaves[:3 if state is None else 5]]))
    (out, final, grads), (out64, final64, grads64) = runs
    budget = BUDGET[dtype]
    assert out.dtype == dtype and rel(out.double(), out64) <= budget
    for a, b in zip(final, final64):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        # fp32 sums of the keys' parts, whatever the dtype of the saved chunk states (bf16 for packs):
        # the fp16 budget would let a bf16 rounding of every chunk's own part through
        final_budget = 1e-3 if dtype == torch.float16 else budget
        assert (a.double() - b)[finite].norm() <= final_budget * max(b[finite].norm().item(), 1.0)
    for a, b in zip(grads, grads64):
        assert rel(a.double(), b) <= budget


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_an_fp16_pack_from_states_is_as_accurate_as_its_sequences_alone():
    """fp16 packs keep fp32 chunk states as unpacked calls do (review R33: bf16 states made the
    first rows of each sequence, where its initial state dominates, 4e-3 off float64, ~10x the
    unpacked call's error): every sequence of the pack equals its own unpacked call, row by row."""
    q, k, v, cu = (t.to(DEVICE) for t in packed([3, 0, 64, 1], d=16, e=24))
    gen = torch.Generator().manual_seed(13)
    kp, vp = torch.randn(4, 2, 60, 16, generator=gen, dtype=torch.float64), torch.randn(
        4, 2, 60, 24, generator=gen, dtype=torch.float64)
    P = projection(17, 16).to(DEVICE)
    state = keys_state(kp.to(DEVICE), vp.to(DEVICE), P).to(torch.float32)
    half = [t.half() for t in (q, k, v, P)]
    out = favor_attention(*half, causal=True, key_stabilizer="prefix", cu_seqlens=cu, initial_state=state,
                          backend="triton")
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if a == b:
            continue
        alone = favor_attention(*(t[:, :, a:b] for t in half[:3]), half[3], causal=True, key_stabilizer="prefix",
                                initial_state=AttentionState(*(t[i:i + 1] for t in state)), backend="triton")
        exact = favor_attention(*(t[:, :, a:b] for t in (q, k, v)), P, causal=True, key_stabilizer="prefix",
                                initial_state=AttentionState(*(t[i:i + 1].double() for t in state)))
        scale = exact.abs().amax().item()
        assert (alone.double() - exact).abs().max() <= 1e-3 * scale  # (the unpacked call: fp32 states)
        assert (out[:, :, a:b].double() - alone.double()).abs().max() <= 5e-4 * scale, i


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_packs_the_kernels_do_not_take_run_one_sequence_at_a_time():
    """fp32 (and heads over 64): the pack's fused kernels refuse it, backend='triton' runs each
    sequence on the unpacked kernels."""
    q, k, v, cu = packed([3, 0, 5], d=16, e=8, dtype=torch.float32)
    P = projection(12, 16).float()
    fused = favor_attention(q, k, v, P, causal=True, cu_seqlens=cu, backend="triton")
    plain = favor_attention(q, k, v, P, causal=True, cu_seqlens=cu, backend="torch")
    assert rel(fused, plain) <= BUDGET[torch.float32]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_packed_sequences_on_the_kernels_under_torch_compile():
    """The fused pack in a compiled training step (fullgraph, backward): the eager results."""
    q, k, v, cu = (rearranged(t) if t.dim() == 4 else t for t in packed([5, 70, 0, 9], dtype=torch.bfloat16))
    P = projection().to(torch.bfloat16)

    def step(q, k, v, cu):
        out = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", cu_seqlens=cu, backend="triton")
        return out.float().square().sum()

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
        fn(*leaves, cu).backward()
        grads.append([t.grad.float() for t in leaves])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and rel(a, b) <= 1e-3


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_op_passes_opcheck(causal):
    """favor_fwd with cu_seqlens on the kernels: schema, fake tensors (the saved states of a pack
    are shaped from shapes alone), autograd registration."""
    from performer_triton.ops import favor_fwd

    q, k, v, cu = packed([3, 0, 5], d=16, e=8, dtype=torch.float16)
    P = projection(12, 16).to(torch.float16)
    args = (*(t.clone().requires_grad_() for t in (q, k, v)), P, causal, 0, causal, True, 1e-6, cu)
    torch.library.opcheck(favor_fwd, args)


def test_bad_cu_seqlens_are_refused_under_torch_compile_too():
    """A compiled graph skips the host read of the offsets (the kernels clamp them); the PyTorch
    path reads them anyway and checks them: no output of another length than q."""
    q, k, v, cu = packed([3, 4])
    P = projection()
    call = torch.compile(favor_attention, backend="aot_eager")
    for bad in ([0, 5, 3, 7], [2, 7], [0, 3, 9]):
        with pytest.raises(ValueError, match="rise from 0 to the packed length 7"):
            call(q, k, v, P, causal=True, cu_seqlens=torch.tensor(bad, dtype=torch.int32), backend="torch")


def test_bad_cu_seqlens_are_refused():
    q, k, v, cu = packed([3, 4])
    P = projection()
    with pytest.raises(TypeError, match="1-D int32 or int64 tensor"):
        favor_attention(q, k, v, P, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="rise from 0 to the packed length 7"):
        favor_attention(q, k, v, P, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise from 0 to the packed length 7"):
        favor_attention(q, k, v, P, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="got batch 2"):
        favor_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), P, cu_seqlens=cu)
    with pytest.raises(ValueError, match="key_padding_mask"):
        favor_attention(q, k, v, P, cu_seqlens=cu, key_padding_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="one state per sequence"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", cu_seqlens=cu,
                        initial_state=AttentionState.empty(1, 2, 20, 7, dtype=torch.float64))
    state = AttentionState.empty(2, 2, 20, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch 2 expected in hz, v_sum, ref and stab, got \[2, 1, 2, 2\]"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", cu_seqlens=cu,
                        initial_state=state._replace(v_sum=state.v_sum[:1]))
    with pytest.raises(TypeError, match="initial_state must be an AttentionState .*got list"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", cu_seqlens=cu, initial_state=list(state))
    _, made = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)
    with pytest.raises(ValueError, match="initial_state.ref / stab hold NaN"):  # (it read as relu features)
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix",
                        initial_state=made._replace(stab=torch.full_like(made.stab, float("nan"))))
    assert (made.ref <= made.stab).all()  # every state a call makes; one with ref > stab gave NaN outputs
    with pytest.raises(ValueError, match="initial_state.ref exceeds its stab"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix",
                        initial_state=made._replace(ref=made.stab + 1))


def test_chain_states_checks_its_states():
    """chain_states names the state that differs (shape, kind) instead of broadcasting a batch-1
    state or failing inside torch."""
    from performer_triton.attention_state import chain_states

    first = AttentionState.empty(3, 2, 8, 4)
    assert chain_states(first, AttentionState.empty(3, 2, 8, 4)).hz.shape == (3, 2, 8, 5)
    with pytest.raises(ValueError, match=r"then.hz must have shape \(3, 2, 8, 5\).*got \(3, 2, 9, 5\)"):
        chain_states(first, AttentionState.empty(3, 2, 9, 4))
    with pytest.raises(ValueError, match=r"then.hz must have shape \(3, 2, 8, 5\).*got \(1, 2, 8, 5\)"):
        chain_states(first, AttentionState.empty(1, 2, 8, 4))
    with pytest.raises(TypeError, match="then must be an AttentionState .*got tuple"):
        chain_states(first, (first.hz, first.v_sum))
    with pytest.raises(TypeError, match="first must be an AttentionState .*got str"):
        chain_states("state", first)
    k, v = torch.randn(3, 2, 5, 6), torch.randn(3, 2, 5, 4)
    proj = gaussian_orthogonal_random_matrix(8, 6)

    softmax, relu = keys_state(k, v, proj), keys_state(k, v, proj, feature_map="relu")
    assert torch.allclose(chain_states(softmax, AttentionState.empty(3, 2, 8, 4)).hz, softmax.hz)
    with pytest.raises(ValueError, match="made by different feature maps"):
        chain_states(softmax, relu)


def test_a_state_converts_and_survives_torch_save(tmp_path):
    """state.to(dtype / device) converts every field; torch.save / torch.load with load's default
    weights_only=True gives the AttentionState back (it failed: an unknown global)."""
    q, k, v = (torch.randn(1, 2, 7, x, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
               for x in (12, 12, 7))
    P = projection()
    _, state = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", output_final_state=True)
    low = state.to(torch.float32)
    assert isinstance(low, AttentionState) and all(t.dtype == torch.float32 for t in low)
    assert all(torch.equal(a.double(), b.double().float().double()) for a, b in zip(low, state))
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")
    assert isinstance(loaded, AttentionState) and all(torch.equal(a, b) for a, b in zip(loaded, state))
    out = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=loaded)
    assert torch.equal(out, favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", initial_state=state))
