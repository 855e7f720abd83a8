"""The functional API and FastAttention: dispatch, validation, autograd, torch.library, compile."""
import contextlib
import io

from functools import partial

import pytest
import torch
from conftest import DEVICE, HAS_TRITON
from kernel_cases import BUDGET, FP32_GRAD_BUDGET

from performer_triton import FastAttention, favor_attention, gaussian_orthogonal_random_matrix, linear_attention
from performer_triton import reference
from performer_triton import functional, ops
from performer_triton.ops import favor_fwd


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp32_tol(backend: str) -> float:
    """fp32 output budget: the PyTorch path computes in fp32, the kernels' dots run in TF32
    (emulated by the interpreter, conftest._tf32)."""
    return BUDGET[torch.float32] if backend == "triton" else 1e-5


def qkv(b=2, h=3, n=37, d=16, e=None, dtype=torch.float32, s=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = n if s is None else s
    e = d if e is None else e
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, s, e, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def projection(m, d, seed=0):
    return gaussian_orthogonal_random_matrix(m, d, generator=torch.Generator().manual_seed(seed))


CASES = [
    dict(causal=False, key_stabilizer="global"),
    dict(causal=True, key_stabilizer="global"),
    dict(causal=True, key_stabilizer="prefix"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("feature_map", ["softmax", "relu", "none", torch.nn.Softplus()])
def test_torch_backend_matches_reference(case, feature_map):
    q, k, v = qkv(n=37, d=16, e=24)
    P = projection(44, 16)
    out = favor_attention(q, k, v, P, feature_map=feature_map, backend="torch", **case)
    ref = reference.favor_attention(q.double(), k.double(), v.double(), P.double(), feature_map=feature_map, **case)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 37, 24)
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("feature_map", ["relu", "none", torch.nn.Softplus()])
def test_float64_gradcheck_through_the_op(case, feature_map):
    """Feature maps without a stabilizer are differentiated exactly: finite differences agree."""
    q, k, v = qkv(b=1, h=2, n=9, d=8, e=5, dtype=torch.float64)
    P = projection(12, 8).double()
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    fn = lambda q, k, v: favor_attention(q, k, v, P, feature_map=feature_map, backend="torch", **case)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 37, 257])
def test_softmax_gradients_equal_the_reference_in_float64(case, n):
    """Softmax features hold their stabilizers constant (detached, as 1.1.4), so finite differences
    do not apply; the hand-written backward must equal the reference's autograd to rounding."""
    q, k, v = qkv(b=1, h=2, n=n, d=12, e=7, dtype=torch.float64)
    P = projection(30, 12).double()
    grad = torch.randn(1, 2, n, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = tuple(t.clone().requires_grad_() for t in (q, k, v))
    theirs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    favor_attention(*ours, P, backend="torch", **case).backward(grad)
    reference.favor_attention(*theirs, P, **case).backward(grad)
    for a, b in zip(ours, theirs):  # absolute floor: with one key, dq and dk are exactly 0
        assert (a.grad - b.grad).norm() <= 1e-12 * max(b.grad.norm().item(), 1.0)


@pytest.mark.parametrize("feature_map", ["softmax", "relu"])
def test_noncausal_chunking_does_not_change_the_result(monkeypatch, feature_map):
    """The PyTorch path's non-causal chunks (torch_backend._wide_rows: one chunk here) give the
    reference's outputs and gradients in float64, and so do 64-row chunks (5 of them)."""
    from performer_triton import torch_backend

    q, k, v = qkv(b=1, h=2, n=300, d=12, e=7, dtype=torch.float64)
    P = projection(30, 12).double()
    grad = torch.randn(1, 2, 300, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    ref = reference.favor_attention(*theirs, P, causal=False, feature_map=feature_map)
    ref.backward(grad)
    for tile in (torch_backend.FEATURE_TILE, 1):
        monkeypatch.setattr(torch_backend, "FEATURE_TILE", tile)
        ours = tuple(t.clone().requires_grad_() for t in (q, k, v))
        out = favor_attention(*ours, P, causal=False, feature_map=feature_map, backend="torch")
        out.backward(grad)
        assert (out - ref).norm() <= 1e-12 * ref.norm()
        for a, b in zip(ours, theirs):
            assert (a.grad - b.grad).norm() <= 1e-12 * b.grad.norm()


@pytest.mark.parametrize("case", [dict(), dict(key_stabilizer="prefix"), dict(feature_map="relu")],
                         ids=["global", "prefix", "relu"])
def test_causal_blocks_of_chunks_equal_the_reference(monkeypatch, case):
    """The causal PyTorch path batches whole chunks into blocks and scans their states: with
    8-row chunks, 8 to a block (n = 150: 2 full blocks, a block of 2 chunks, a 6-row tail),
    outputs and gradients equal the reference's in float64; with a trainable projection too (the
    forward's blocks under autograd, which records them)."""
    from performer_triton import torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK", 8)
    monkeypatch.setattr(torch_backend, "FEATURE_TILE", 64 * 2 * 30)  # 64-row blocks at b h = 2, m = 30
    assert torch_backend._blocks(150, 2, 30) == [(slice(0, 64), 8), (slice(64, 128), 8), (slice(128, 144), 8),
                                                 (slice(144, 150), 6)]
    q, k, v = qkv(b=1, h=2, n=150, d=12, e=7, dtype=torch.float64)
    P = projection(30, 12).double()
    grad = torch.randn(1, 2, 150, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = tuple(t.clone().requires_grad_() for t in (q, k, v))
    theirs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out = favor_attention(*ours, P, causal=True, backend="torch", **case)
    ref = reference.favor_attention(*theirs, P, causal=True, **case)
    out.backward(grad)
    ref.backward(grad)
    assert (out - ref).norm() <= 1e-12 * ref.norm()
    for a, b in zip(ours, theirs):
        assert (a.grad - b.grad).norm() <= 1e-12 * b.grad.norm()
    trained = [P.clone().requires_grad_() for _ in range(2)]
    favor_attention(q, k, v, trained[0], causal=True, backend="torch", **case).backward(grad)
    reference.favor_attention(q, k, v, trained[1], causal=True, **case).backward(grad)
    assert (trained[0].grad - trained[1].grad).norm() <= 1e-12 * trained[1].grad.norm()


@pytest.mark.parametrize("causal", [False, True])
def test_saved_for_backward_is_linear_in_n_without_features(causal):
    """What autograd keeps between forward and backward (PyTorch path, default arguments): q, k,
    v, out, four per-row statistics and the (m, e+1) context (non-causal) or the (m, e+1) state
    before each chunk of CHUNK rows (causal) - never an (n, m) feature tensor (issue 15: saved
    memory O(n (d + e)))."""
    from performer_triton.torch_backend import CHUNK

    b, h, n, d, e, m = 1, 2, 300, 12, 7, 40
    q, k, v = (t.requires_grad_() for t in qkv(b=b, h=h, n=n, d=d, e=e))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = favor_attention(q, k, v, projection(m, d), causal=causal, backend="torch")
    out.sum().backward()
    context = b * h * -(-n // CHUNK) * (m * (e + 1) + 1) if causal else b * h * m * (e + 1)
    assert sum(saved) <= b * h * n * (2 * d + 2 * e + 4) + m * d + context, saved


def test_cross_attention_lengths():
    q, k, v = qkv(n=5, s=41, d=16)
    P = projection(30, 16)
    out = favor_attention(q, k, v, P, backend="torch")
    ref = reference.favor_attention(q.double(), k.double(), v.double(), P.double())
    assert out.shape == (2, 3, 5, 16) and rel(out, ref) <= 1e-5


def test_empty_sequence_returns_empty_and_backprops():
    q, k, v = (t.requires_grad_() for t in qkv(n=0, d=16))
    out = favor_attention(q, k, v, projection(20, 16), causal=True)
    assert out.shape == (2, 3, 0, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shapes", [((0, 2, 5, 8),) * 3, ((2, 0, 5, 8),) * 3, ((2, 2, 0, 8), (2, 2, 5, 8), (2, 2, 5, 8)),
                                    ((2, 2, 5, 8), (2, 2, 5, 8), (2, 2, 5, 0))],
                         ids=["no-batch", "no-heads", "no-queries", "no-value-columns"])
def test_empty_calls_return_empty_and_zero_gradients(causal, shapes):
    """1.1.4's FastAttention returns (0, h, n, e), (b, 0, n, e), (b, h, 0, e) and (b, h, n, 0) for
    these and zero gradients for q, k and v; so do ours, every entry point and feature map
    (torch.autograd.grad finds every input used)."""
    q, k, v = (torch.randn(shape).requires_grad_() for shape in shapes)
    calls = [lambda: favor_attention(q, k, v, projection(6, 8), causal=causal),
             lambda: favor_attention(q, k, v, projection(6, 8), causal=causal, feature_map="relu"),
             lambda: favor_attention(q, k, v, None, causal=causal, feature_map="none"),
             lambda: favor_attention(q, k, v, projection(6, 8), causal=causal, key_padding_mask=torch.ones(
                 k.shape[0], k.shape[2], dtype=torch.bool)),
             lambda: linear_attention(q.exp(), k.exp(), v, causal=causal),
             lambda: FastAttention(8, 6, causal=causal)(q, k, v)]
    for call in calls:
        out = call()
        assert out.shape == q.shape[:3] + v.shape[3:]
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for x, g in zip((q, k, v), grads):
            assert g.shape == x.shape and not g.any()


def test_prefix_stabilizer_with_every_query_padded_backpropagates():
    """A mask with a hole (compacted per row) whose queries are all padded: zero outputs that are
    still connected to q, k and v, as with the global stabilizer."""
    q = torch.randn(1, 2, 1, 8, requires_grad=True)  # one query at the last position (a cached step)
    k, v = (torch.randn(1, 2, 10, 8, requires_grad=True) for _ in range(2))
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 0] = keep[0, 9] = False
    for stabilizer in ("global", "prefix"):
        out = favor_attention(q, k, v, projection(6, 8), causal=True, key_stabilizer=stabilizer,
                              key_padding_mask=keep)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert not out.any() and not any(g.any() for g in grads)


def test_non_contiguous_inputs_equal_contiguous():
    q, k, v = qkv(n=37, d=16)
    P = projection(44, 16)
    # (b, n, h, d) storage viewed as (b, h, n, d), and a transposed last dim made contiguous
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    for case in CASES:
        a = favor_attention(q, k, v, P, backend="torch", **case)
        b = favor_attention(qt, kt, vt, P, backend="torch", **case)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    vd = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1
    assert torch.allclose(favor_attention(q, k, v, P), favor_attention(q, k, vd, P), rtol=1e-6, atol=1e-6)


def test_linear_attention_on_features():
    q, k, v = qkv(n=37, d=16)
    qf, kf = reference.feature_maps(q.double(), k.double(), projection(44, 16).double(), causal=True)
    for causal in (False, True):
        out = linear_attention(qf.float(), kf.float(), v, causal=causal, backend="torch")
        ref = reference.linear_attention(qf, kf, v.double(), causal=causal)
        assert rel(out, ref) <= 1e-5


def test_key_padding_mask_excludes_padded_keys():
    q, k, v = qkv(b=2, n=20, d=16)
    P = projection(44, 16)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 11:] = False
    for causal in (False, True):
        out = favor_attention(q, k, v, P, causal=causal, key_padding_mask=mask, backend="torch")
        alone = favor_attention(q[:1, :, :11], k[:1, :, :11], v[:1, :, :11], P, causal=causal, backend="torch")
        assert rel(out[:1, :, :11], alone) <= 1e-5
        if not causal:  # every query of the padded row sees only the 11 real keys
            alone_q = favor_attention(q[:1], k[:1, :, :11], v[:1, :, :11], P, backend="torch")
            assert rel(out[:1], alone_q) <= 1e-5


BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def on_a_path(causal: bool, feature_map: str, backend: str) -> bool:
    """Whether (causal, feature_map, backend) is a path of its own: causal 'none' runs in float64
    on the PyTorch path whatever the backend (test_triton_backend_runs_causal_no_projection_on_the_
    pytorch_path), so its 'triton' cases would test the PyTorch path twice."""
    return not (causal and feature_map == "none" and backend == "triton")


@pytest.mark.parametrize("feature_map, causal, backend", [
    (f, c, b) for f in ("softmax", "relu", "none") for c in (False, True) for b in BACKENDS if on_a_path(c, f, b)])
def test_fully_masked_rows_give_finite_zeros_and_gradients(backend, causal, feature_map):
    """Masked keys enter through selection: a batch row with every key padded (holding NaN) gives
    zeros, and NaN/inf in padded positions reach neither kept outputs nor any gradient."""
    q, k, v = (t.to(DEVICE) for t in qkv(b=2, h=2, n=9, d=8, e=5))
    k[1], v[1] = float("nan"), float("inf")
    k[0, :, 6:] = 1e4  # huge padded keys: exp overflow if computed
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask[0, 6:] = False
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    P = projection(12, 8).to(DEVICE)
    out = favor_attention(*leaves, P, causal=causal, feature_map=feature_map, key_padding_mask=mask, backend=backend)
    out.square().sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.equal(leaves[1].grad[1], torch.zeros_like(leaves[1].grad[1]))
    kept = favor_attention(q[:1, :, :6], k[:1, :, :6], v[:1, :, :6], P, causal=causal, feature_map=feature_map,
                           backend=backend)
    assert rel(out[:1, :, :6], kept) <= fp32_tol(backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_causal_no_projection_later_non_finite_key_leaves_earlier_rows(bad, dtype):
    """Causal "none" features shift the keys of a head by their max (_exp_shift): taken over the
    finite keys, so a NaN / +inf key at position j changes no output before j (1.1.4 takes exp(k)
    per element: its earlier rows are untouched too)."""
    q, k, v = qkv(b=1, h=2, n=12, d=8, dtype=dtype)
    clean = favor_attention(q, k, v, None, causal=True, feature_map="none")
    k[:, :, 7, 3] = bad
    out = favor_attention(q, k, v, None, causal=True, feature_map="none")
    assert torch.equal(out[:, :, :7], clean[:, :, :7])


HUGE_CASES = [(backend, dtype, scale) for backend in BACKENDS
              for dtype, scale in [(torch.float32, 1e14), (torch.float32, 6e10), (torch.bfloat16, 3e12),
                                   (torch.float64, 1e20)]
              if backend == "torch" or dtype != torch.float64]  # (the kernels take fp32, fp16, bf16)


@pytest.mark.parametrize("huge", ["one key and query", "every key"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend, dtype, scale", HUGE_CASES, ids=str)
def test_huge_keys_or_queries_keep_every_output_finite(backend, causal, dtype, scale, huge):
    """Keys and queries of norm ~1e11-1e14 (fp32): the row max of their dash, kept in natural
    units (or made by another kernel), can exceed the dash the features are then taken of by more
    than exp's range; the exponents are clamped (they are <= 0 exactly). 1.1.4 and float64 are
    finite here; every output and gradient must be, and the outputs close to float64's."""
    tol = {torch.float64: 1e-10, torch.float32: fp32_tol(backend), torch.bfloat16: 3e-2}[dtype]
    for d, m in [(8, 12), (8, 16), (16, 16)]:  # (which rows overflowed depended on the projection)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 20, d, generator=g, dtype=torch.float64) for _ in range(3))
        if huge == "every key":
            k *= scale
        else:
            k[:, :, 2] *= scale
            q[:, :, 5] *= scale
        P = projection(m, d).to(DEVICE, torch.float64 if dtype == torch.float64 else torch.float32)
        leaves = tuple(t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))
        out = favor_attention(*leaves, P, causal=causal, backend=backend)
        out.float().square().sum().backward()
        assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in leaves), (d, m)
        ref = reference.favor_attention(*(t.detach().double().cpu() for t in leaves), P.double().cpu(), causal=causal)
        assert rel(out.double().cpu(), ref) <= tol, (d, m)


@pytest.mark.parametrize("feature_map, backend", [
    (f, b) for f in ("softmax", "relu", "none") for b in BACKENDS if on_a_path(True, f, b)])
@pytest.mark.parametrize("case", CASES[1:])
@pytest.mark.parametrize("n", [1, 5, 37])
def test_causal_queries_after_a_longer_key_prefix(backend, case, feature_map, n):
    """Causal with n queries and s > n keys (the KV-cache call): the queries are the last n of
    the s positions (bottom-right aligned), as the last n rows of one call over all s positions,
    gradients included; the earlier positions' queries do not matter."""
    s = 70
    q_all, k, v = (t.to(DEVICE) for t in qkv(b=2, h=2, n=s, d=8, e=6))
    P = projection(12, 8).to(DEVICE)
    g = torch.randn(2, 2, n, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ours = tuple(t.clone().requires_grad_() for t in (q_all[:, :, s - n:], k, v))
    out = favor_attention(*ours, P, feature_map=feature_map, backend=backend, **case)
    out.backward(g)
    theirs = tuple(t.double().requires_grad_() for t in (q_all, k, v))
    ref = reference.favor_attention(*theirs, P.double(), feature_map=feature_map, **case)[:, :, s - n:]
    ref.backward(g.double())
    tol = fp32_tol(backend) if backend == "triton" else 1e-5
    assert out.shape == (2, 2, n, 6) and rel(out, ref) <= tol
    assert rel(ours[0].grad, theirs[0].grad[:, :, s - n:]) <= 3 * tol
    assert torch.equal(theirs[0].grad[:, :, : s - n], torch.zeros_like(theirs[0].grad[:, :, : s - n]))
    for a, b in zip(ours[1:], theirs[1:]):
        assert rel(a.grad, b.grad) <= 3 * tol


def test_fast_attention_kv_cache_call():
    """FastAttention(causal=True) with one query and the whole key cache gives the last row of
    the full-sequence call (1.1.4 attended to the first key only)."""
    torch.manual_seed(0)
    attn = FastAttention(16, nb_features=24, causal=True, key_stabilizer="prefix")
    q, k, v = qkv(b=1, h=2, n=33, d=16)
    full = attn(q, k, v)
    for i in (0, 10, 32):
        step = attn(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1])
        assert rel(step, full[:, :, i : i + 1]) <= 1e-5


def test_autocast_runs_in_low_precision():
    q, k, v = qkv(n=37, d=16)
    P = projection(44, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = favor_attention(q, k, v, P, causal=True, backend="torch")
    assert out.dtype == torch.bfloat16
    ref = reference.favor_attention(q.double(), k.double(), v.double(), P.double(), causal=True)
    assert rel(out, ref) <= 3e-2
    # inside, the PyTorch path computes in fp32 as for bf16 inputs (autocast would recast its products)
    for causal in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = favor_attention(*leaves, P, causal=causal, backend="torch")
        out.float().square().sum().backward()
        low = [t.bfloat16().detach().requires_grad_() for t in (q, k, v)]
        expected = favor_attention(*low, P, causal=causal, backend="torch")
        expected.float().square().sum().backward()
        assert torch.equal(out, expected)
        for ours, theirs in zip(leaves, low):
            assert torch.equal(ours.grad, theirs.grad.float())


# ---------------------------------------------------------------- FastAttention


def test_fast_attention_is_a_drop_in_for_performer_pytorch():
    pp = pytest.importorskip("performer_pytorch.performer_pytorch")
    for causal in (False, True):
        for kwargs in (dict(), dict(generalized_attention=True), dict(no_projection=True)):
            with contextlib.redirect_stdout(io.StringIO()):
                theirs = pp.FastAttention(16, 44, 0, causal, **kwargs).double()
            ours = FastAttention(16, 44, 0, causal, **kwargs).double()
            assert ours.state_dict().keys() == theirs.state_dict().keys()
            ours.load_state_dict(theirs.state_dict(), strict=True)
            q, k, v = qkv(n=37, d=16, dtype=torch.float64)
            assert rel(ours(q, k, v), theirs(q, k, v)) <= 1e-12


def test_fast_attention_defaults_and_redraw():
    fa = FastAttention(64)
    assert fa.projection_matrix.shape == (266, 64) and fa.nb_features == 266
    before = fa.projection_matrix.clone()
    fa.redraw_projection_matrix(torch.device("cpu"))
    assert not torch.equal(before, fa.projection_matrix)
    fa.redraw_projection_matrix(generator=torch.Generator().manual_seed(3))
    a = fa.projection_matrix.clone()
    fa.redraw_projection_matrix(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, fa.projection_matrix)


def test_fast_attention_prefix_is_leak_free():
    fa = FastAttention(16, 44, causal=True, key_stabilizer="prefix").double()
    q, k, v = qkv(n=40, d=16, dtype=torch.float64)
    k2 = k.clone()
    k2[:, :, 21:] *= 3
    a, b = fa(q, k, v), fa(q, k2, v)
    assert (a[:, :, :21] - b[:, :, :21]).abs().max() <= 1e-12
    assert (a[:, :, 21:] - b[:, :, 21:]).abs().max() > 1e-3


# ---------------------------------------------------------------- bad input


def bad(match, exc=ValueError):
    return pytest.raises(exc, match=match)


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(n=8, d=16)
    P = projection(20, 16)
    with bad("q must have 4 dimensions"):
        favor_attention(q[0], k, v, P)
    with bad("must have a floating-point dtype", TypeError):
        favor_attention(q.long(), k, v, P)
    with bad("must have a floating-point dtype", TypeError):
        favor_attention(torch.complex(q, q), k, v, P)
    with bad("must share one dtype", TypeError):
        favor_attention(q, k.double(), v, P)
    with bad("must share \\(batch, heads\\)"):
        favor_attention(q, k[:, :2], v[:, :2], P)
    with bad("k and v must have the same length", RuntimeError):  # (and a ValueError; 1.1.4: RuntimeError)
        favor_attention(q, k, v[:, :, :5], P)
    with bad("must share \\(batch, heads\\)", RuntimeError):
        favor_attention(q, k[:, :2], v[:, :2], P)
    with bad("at most as many queries as keys .* q of length 8 and k of length 5"):
        favor_attention(q, k[:, :, :5], v[:, :, :5], P, causal=True)
    with bad("at most as many queries as keys .* q of length 8 and k of length 7"):  # (the boundary: n = s + 1)
        favor_attention(q, k[:, :, :7], v[:, :, :7], P, causal=True)
    with bad("projection_matrix must have shape \\(nb_features, 16\\)"):
        favor_attention(q, k, v, projection(20, 8))
    with bad("projection_matrix must be a torch.Tensor", TypeError):
        favor_attention(q, k, v, None)
    with bad("requires grad, but initial_state / output_final_state keep it fixed"):
        favor_attention(q, k, v, P.clone().requires_grad_(), causal=True, key_stabilizer="prefix",
                        output_final_state=True)
    with bad("backend='triton': the fused kernels send no gradient to projection_matrix"):
        favor_attention(q, k, v, P.clone().requires_grad_(), backend="triton")
    with bad("key_stabilizer must be one of"):
        favor_attention(q, k, v, P, causal=True, key_stabilizer="local")
    with bad("non-causal attention accepts 'global'"):
        favor_attention(q, k, v, P, key_stabilizer="prefix")
    with bad("backend must be one of"):
        favor_attention(q, k, v, P, backend="cuda")
    # a kernel_fn whose features are not (b, h, n, m'): named with the shape it returned (it failed
    # inside the products, naming neither)
    for kernel_fn, got in ((lambda x: x.sum(-1), r"got \(2, 3, 8\)"), (lambda x: x.relu()[..., None], r"got \(2, 3, 8, 20, 1\)")):
        for causal in (False, True):
            with bad(r"kernel_fn .* must map .* \(2, 3, 8, 'm'\) .*" + got):
                favor_attention(q, k, v, P, feature_map=kernel_fn, causal=causal)
    # (one that changes the width keeps working, as in 1.1.4)
    doubled = favor_attention(q, k, v, P, feature_map=lambda x: torch.cat([x.relu(), (-x).relu()], -1))
    assert doubled.shape == v.shape and torch.isfinite(doubled).all()
    with bad("feature_map must be one of"):
        favor_attention(q, k, v, P, feature_map="gelu")
    with bad("key_padding_mask must have shape"):
        favor_attention(q, k, v, P, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with bad("key_padding_mask must be a bool tensor", TypeError):
        favor_attention(q, k, v, P, key_padding_mask=torch.ones(2, 8))
    with bad("k has length 0"):
        favor_attention(q, k[:, :, :0], v[:, :, :0], P)
    with bad("q_features and k_features must have the same last dimension"):
        linear_attention(q, k[..., :4], v)
    with bad("dim_heads=16"):
        FastAttention(16)(q[..., :8], k[..., :8], v)
    with bad("causal must be a bool, got str", TypeError):  # not the op schema's RuntimeError
        favor_attention(q, k, v, P, causal="yes")
    with bad("causal must be a bool, got NoneType", TypeError):  # not silently non-causal
        linear_attention(q.exp(), k.exp(), v, causal=None)
    with bad("applies to causal attention only"):
        FastAttention(16, key_stabilizer="prefix")


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_or_feature_count_of_zero_is_named_before_any_math(causal):
    """d = 0 reached the features' d ** -0.25: a ZeroDivisionError in every map."""
    from performer_triton.attention_state import keys_state
    from performer_triton.performer_pytorch import causal_linear_attention_noncuda
    from performer_triton.performer_pytorch import linear_attention as module_linear_attention

    q, v = torch.randn(2, 3, 6, 0), torch.randn(2, 3, 6, 4)
    shapes = r"got shapes \(2, 3, 6, 0\) and \(2, 3, 6, 0\)"
    for feature_map in ("softmax", "relu", "none", torch.nn.functional.softplus):
        P = None if feature_map == "none" else torch.randn(5, 0)
        with bad(f"q and k must have a last dimension .* >= 1, {shapes}"):
            favor_attention(q, q, v, P, causal=causal, feature_map=feature_map)
    with bad(f"q_features and k_features must have a last dimension .* >= 1, {shapes}"):
        linear_attention(q, q, v, causal=causal)
    with bad(r"k must have a last dimension .* >= 1, got shape \(2, 3, 6, 0\)"):
        keys_state(q, v, torch.randn(5, 0))
    with bad(r"q and k must have at least one feature .* got shapes \(6, 0\) and \(6, 0\)"):
        module_linear_attention(q[0, 0], q[0, 0], v[0, 0])  # 1.1.4's helpers, in the caller's shapes
    with bad(r"q and k must have at least one feature .* got shapes \(2, 3, 6, 0\)"):
        causal_linear_attention_noncuda(q, q, v)


def test_linear_attention_eps_must_be_a_finite_number_at_least_0():
    qf, kf, v = torch.rand(1, 2, 6, 4), torch.rand(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    for eps in (float("nan"), float("inf"), -1e-3):
        with bad(f"eps must be a finite number >= 0.0, got {eps}"):
            linear_attention(qf, kf, v, causal=True, eps=eps)
    with pytest.raises(TypeError, match="eps must be a number, got str"):
        linear_attention(qf, kf, v, causal=True, eps="x")
    assert torch.isfinite(linear_attention(qf, kf, v, causal=True, eps=0)).all()


def test_mixed_devices_raise():
    q, k, v = qkv(n=8, d=16)
    with bad("must be on one device"):
        favor_attention(q, k.to("meta"), v, projection(20, 16))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    q, k, v = qkv(n=8, d=16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with bad("TRITON_INTERPRET=1"):
        favor_attention(q, k, v, projection(20, 16), backend="triton")
    with bad("float16, bfloat16 and float32"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        favor_attention(q.double(), k.double(), v.double(), projection(20, 16), backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_backend_runs_causal_no_projection_on_the_pytorch_path(monkeypatch):
    """Causal 'none' runs in float64 on the PyTorch path also with backend='triton' (README "What
    runs where"): backend='torch''s result bit for bit, no kernel asked; non-causal 'none' takes
    the kernels (given features)."""
    q, k, v = (t.float().to(DEVICE) for t in qkv(n=9, d=8))
    outs = {b: favor_attention(q, k, v, None, causal=True, feature_map="none", backend=b) for b in ("torch", "triton")}
    assert torch.equal(outs["torch"], outs["triton"])
    asked = []
    monkeypatch.setattr(functional, "_given_attention", lambda *a: asked.append(a[-1]) or torch.zeros(()))
    for causal in (True, False):
        favor_attention(q, k, v, None, causal=causal, feature_map="none", backend="triton")
    assert asked == [False, True]  # use_triton: the PyTorch path for causal, the kernels otherwise


@pytest.mark.skipif(not HAS_TRITON or DEVICE != "cpu", reason="Triton's interpreter (no GPU)")
def test_triton_backend_refuses_bfloat16_where_the_interpreter_multiplies_it_wrongly(monkeypatch):
    """triton-lang/triton#11584: the interpreter's bf16 tl.dot multiplies raw bit patterns.  With
    the suite's patched dot the kernels run bf16 here; with a wrong dot, backend='triton' refuses
    bf16 (and only bf16) instead of returning garbage; 'auto' never asks (CPU tensors take the
    PyTorch path) and gives the float64 result."""
    from triton.runtime import interpreter

    q, k, v = (t.bfloat16() for t in qkv(n=8, d=16))
    P = projection(20, 16).bfloat16()
    functional._bf16_dot_probe.cache_clear()
    assert functional.triton_unsupported(q, v, fused=True) is None
    patched = interpreter.InterpreterBuilder.create_dot

    def wrong_dot(self, *args):
        right = patched(self, *args)
        return interpreter.TensorHandle(right.data + 1, right.dtype)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", wrong_dot)
    functional._bf16_dot_probe.cache_clear()
    try:
        with bad("triton-lang/triton#11584"):
            favor_attention(q, k, v, P, backend="triton")
        assert functional.triton_unsupported(q.half(), v.half(), fused=True) is None
        monkeypatch.setattr(functional, "_interpreter_bf16_dot_exact", lambda: pytest.fail("'auto' probed"))
        assert rel(favor_attention(q, k, v, P), reference.favor_attention(q.double(), k.double(), v.double(),
                                                                           P.double())) <= 3e-2
    finally:
        functional._bf16_dot_probe.cache_clear()


# ---------------------------------------------------------------- torch.library / compile


def test_opcheck_forward_and_backward():
    for causal, feature, prefix in ((False, 0, False), (True, 0, True), (True, 1, False)):
        q, k, v = (t.requires_grad_() for t in qkv(b=1, h=2, n=9, d=8))
        P = projection(12, 8)
        torch.library.opcheck(favor_fwd, (q, k, v, P, causal, feature, prefix, False))


def test_torch_compile_fullgraph():
    fa = FastAttention(16, 44, causal=True, key_stabilizer="prefix", backend="torch")
    q, k, v = qkv(n=37, d=16)
    compiled = torch.compile(fa, fullgraph=True)
    assert torch.allclose(compiled(q, k, v), fa(q, k, v), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the Triton path end to end


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CASES)
def test_triton_backend_end_to_end_with_autograd(case):
    """favor_attention(backend='triton') -> custom op -> kernels (interpreter on CPU), gradients
    included, against the float64 reference."""
    q, k, v = (t.to(DEVICE) for t in qkv(b=1, h=2, n=37, d=16, e=24))
    P = projection(44, 16).to(DEVICE)
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out = favor_attention(*leaves, P, backend="triton", **case)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = tuple(t.double().cpu().requires_grad_() for t in (q, k, v))
    ref = reference.favor_attention(*ref_leaves, P.double().cpu(), **case)
    ref.backward(grad.double().cpu())
    assert rel(out.cpu(), ref) <= BUDGET[torch.float32]
    for ours, theirs in zip(leaves, ref_leaves):
        assert rel(ours.grad.cpu(), theirs.grad) <= FP32_GRAD_BUDGET


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["noncausal", "causal-prefix"])
def test_tf32_operands_are_rounded_to_nearest(case):
    """fp32 on the kernels runs its dots in TF32, whose tensor cores drop the low 13 bits of each
    operand (the suite's interpreter does the same, tests/conftest.py); the kernels round their
    operands to the nearest TF32 value first (feature_map.tf32_nearest).  Truncated operands gave
    out 5.5-8.0e-4, dq 2.1-2.5e-3, dk 2.5-2.7e-3, dv 0.8-1.4e-3 here: their bias adds up."""
    q, k, v = (t.to(DEVICE) for t in qkv(b=1, h=2, n=37, d=16, e=24))
    P = projection(44, 16).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    worst = torch.zeros(4, dtype=torch.float64)
    for _ in range(4):  # upstream gradients
        leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
        out = favor_attention(*leaves, P, backend="triton", **case)
        grad = torch.randn(out.shape, generator=gen).to(DEVICE)
        out.backward(grad)
        ref_leaves = tuple(t.double().cpu().requires_grad_() for t in (q, k, v))
        ref = reference.favor_attention(*ref_leaves, P.double().cpu(), **case)
        ref.backward(grad.double().cpu())
        errs = [rel(out.cpu(), ref)] + [rel(a.grad.cpu(), b.grad) for a, b in zip(leaves, ref_leaves)]
        worst = torch.maximum(worst, torch.tensor(errs, dtype=torch.float64))
    assert worst[0] < 4e-4 and worst[1:3].max() < 1.2e-3 and worst[3] < 5e-4, worst


def test_auto_keeps_exact_fp32_off_the_tf32_kernels(monkeypatch):
    """auto sends fp32 CUDA tensors to the kernels (TF32 dots) only where PyTorch's fp32 matmuls
    may use TF32 too."""

    monkeypatch.setattr(functional, "triton_unsupported", lambda *a, **k: None)
    q = torch.empty(1, 1, 4, 8, device="meta")
    cuda_q = type("FakeCuda", (), {"device": torch.device("cuda"), "dtype": torch.float32})()
    for precision, expected in (("highest", False), ("high", True)):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda p=precision: p)
        assert functional._use_triton("auto", cuda_q, q, True) is expected
    cuda_q.dtype = torch.bfloat16
    assert functional._use_triton("auto", cuda_q, q, True) is True


@pytest.mark.parametrize("dtype,big", [(torch.float16, 14.0), (torch.float32, 95.0), (torch.float64, 5.0),
                                       (torch.float64, 800.0), (torch.float32, 1000.0)])
def test_no_projection_causal_keys_do_not_overflow(dtype, big):
    """1.1.4's exp(k) is inf above ~11 (fp16) / ~88 (fp32) / ~709 (float64) though the attention
    is finite: against the reference, whose causal no_projection shifts each query's keys on its
    own (not the registry's per-head shift and eps scaling, which this checks: review R36's
    mutation of the eps scaling went uncaught while every case stayed below float64's range)."""
    q, k, v = qkv(b=1, h=2, n=20, d=8, dtype=torch.float64)
    k[0, 0, 3, 2] = big
    out = favor_attention(q.to(dtype), k.to(dtype), v.to(dtype), None, causal=True, feature_map="none", backend="torch")
    ref = reference.favor_attention(q, k, v, None, causal=True, feature_map="none")
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= (1e-12 if dtype == torch.float64 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_no_projection_causal_gradients_stay_finite_for_wide_keys(dtype):
    """q, k ~ 3 N(0, 1): the keys are rescaled per head (exp(k) would overflow fp16), and in fp16
    the rescaled keys and eps underflowed to 0: a 0 / 0 normaliser made the value gradients NaN
    while the outputs looked finite. Outputs and gradients are finite and near float64's."""
    q, k, v = qkv(b=2, h=2, n=300, d=16, dtype=torch.float64)
    q, k = 3 * q, 3 * k
    grad = torch.randn(2, 2, 300, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for t in (torch.float64, dtype):
        leaves = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        out = favor_attention(*leaves, None, causal=True, feature_map="none", backend="torch")
        (out.double() * grad).sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for ref, ours in zip(*results):
        assert ours.dtype == dtype and torch.isfinite(ours).all()
    budget = {torch.float16: 3e-2, torch.bfloat16: 1e-1, torch.float32: 1e-3}[dtype]
    assert rel(results[1][0], results[0][0]) <= budget and rel(results[1][3], results[0][3]) <= budget


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [False, True])
def test_no_projection_large_inputs_stay_finite(causal, seed):
    """q, k, v ~ 50 N(0, 1) causal in fp32 (keys spanning more than fp32's exponent range: one
    shift per head left early rows without keys or eps, 0 / 0, and features times values
    overflowed) and ~ 30 N(0, 1) non-causal in fp16 (the key gradients overflowed): outputs and
    gradients finite, as float64's are, and near them."""
    dtype, scale = (torch.float32, 50.0) if causal else (torch.float16, 30.0)
    q, k, v = (scale * t for t in qkv(b=1, h=2, n=24, d=8, dtype=torch.float64, seed=seed))
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the error of the computation, not of the inputs
    results = []
    for t in (torch.float64, dtype):
        leaves = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        out = favor_attention(*leaves, None, causal=causal, feature_map="none")
        out.double().square().sum().backward()
        results.append([out.detach().double()] + [x.grad.double() for x in leaves])
    budget = 1e-5 if causal else 3e-2
    for ref, ours in zip(*results):
        assert torch.isfinite(ref).all() and torch.isfinite(ours).all()
        assert (ours - ref).abs().max() <= budget * ref.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_key_mask_gradients_stay_finite(backend, causal):
    """fp16 softmax attention with a key_padding_mask, q, k ~ 2 N(0, 1): the features are made in
    fp32 (in fp16 the gradients of tiny key features overflowed into NaN at kept keys); gradients
    finite and near float64's."""
    q, k, v = (2 * t for t in qkv(b=1, h=2, n=12, d=8, dtype=torch.float64, seed=5))
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 7:9] = False
    P = projection(16, 8).double()
    results = []
    for t in (torch.float64, torch.float16):
        if t == torch.float16 and backend == "triton":
            q, k, v, P, keep = (x.to(DEVICE) for x in (q, k, v, P, keep))
        leaves = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        out = favor_attention(*leaves, P.to(t), causal=causal, key_padding_mask=keep,
                              backend=backend if t == torch.float16 else "torch")
        out.double().square().sum().backward()
        results.append([x.grad.double().cpu() for x in leaves])
    for ref, ours in zip(*results):
        assert torch.isfinite(ours).all()
        assert rel(ours, ref) <= 3e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_query_without_features_gives_zero(backend, causal):
    """A query whose features are all zero has no normaliser (1.1.4: NaN in both modes): its
    output is 0 and its gradients are finite, causal as non-causal, on both paths."""
    g = torch.Generator().manual_seed(6)
    qf, kf = torch.rand(1, 2, 6, 4, generator=g), torch.rand(1, 2, 6, 4, generator=g)
    v = torch.randn(1, 2, 6, 3, generator=g)
    qf[..., 2, :] = 0.0
    leaves = [t.to(DEVICE).requires_grad_() for t in (qf, kf, v)]
    out = linear_attention(*leaves, causal=causal, backend=backend)
    out.square().sum().backward()
    assert torch.equal(out[..., 2, :], torch.zeros_like(out[..., 2, :]))
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in leaves)
    rest = [0, 1, 3, 4, 5]
    alone = reference.linear_attention(qf.double(), kf.double(), v.double(), causal=causal)
    assert rel(out[..., rest, :].double().cpu(), alone[..., rest, :]) <= fp32_tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, dtype, scale", [
    *((causal, dtype, scale) for causal in (False, True)
      for dtype, scale in ((torch.float32, 1e-30), (torch.float32, 1e18), (torch.bfloat16, 1e30))),
    # subnormal features (their scale 2^133 is no fp32): non-causal only, causal keys are not
    # scaled (the causal eps is not scale-free) and subnormal keys keep few bits
    (False, torch.float32, 1e-40),
])
def test_linear_attention_on_features_of_any_magnitude(backend, causal, dtype, scale):
    """Given features whose q' . k' products leave fp32's range (1.1.4 and an unscaled op: 0 or
    NaN) give the exact result, invariant to the scale of q' (and k'): out and gradients match
    float64 on the same inputs, with and without a state (the kernels take none with given features)."""
    g = torch.Generator().manual_seed(7)
    qf, kf = ((torch.rand(1, 2, 37, 13, generator=g, dtype=torch.float64) + 0.1) * scale for _ in range(2))
    v = torch.randn(1, 2, 37, 5, generator=g, dtype=torch.float64)
    qf, kf, v = (t.to(dtype).double() for t in (qf, kf, v))  # representable in dtype
    w = torch.randn(1, 2, 37, 5, generator=g, dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (qf, kf, v)]
    ref = reference.linear_attention(*ref_leaves, causal=causal)
    (ref * w).sum().backward()
    leaves = [t.to(dtype).to(DEVICE).requires_grad_() for t in (qf, kf, v)]
    out = linear_attention(*leaves, causal=causal, backend=backend)
    (out.double().cpu() * w).sum().backward()
    tol = 3e-2 if dtype == torch.bfloat16 else fp32_tol(backend)
    assert rel(out.double().cpu(), ref) <= tol
    for got, want in zip(leaves, ref_leaves):
        if want.grad.abs().max() < torch.finfo(dtype).max / 8:  # (1e-40: dq, dk ~ 4e38 exceed fp32)
            assert rel(got.grad.double().cpu(), want.grad) <= 4 * tol
        else:
            assert not got.grad.isnan().any()
    if causal:
        stated, _ = linear_attention(*(t.detach() for t in leaves), causal=True, output_final_state=True)
        assert rel(stated.double().cpu(), ref) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_nan_key_never_reaches_earlier_outputs(backend):
    """Leak-free causal attention: a NaN key at position j leaves outputs before j untouched, also
    inside j's own chunk (selection, not 0 * NaN)."""
    q, k, v = (t.to(DEVICE) for t in qkv(b=1, h=2, n=150, d=8))
    P = projection(12, 8).to(DEVICE)
    clean = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", backend=backend)
    k[0, :, 140] = float("nan")
    out = favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", backend=backend)
    assert torch.equal(out[:, :, :140], clean[:, :, :140])
    assert torch.isnan(out[:, :, 140:]).all()


@pytest.mark.parametrize("case, backend", [
    pytest.param(case, b, id=f"{name}-{b}")
    for name, case in (("prefix", dict(key_stabilizer="prefix")), ("global", {}), ("relu", dict(feature_map="relu")),
                       ("none", dict(feature_map="none")))
    for b in BACKENDS if on_a_path(True, case.get("feature_map", "softmax"), b)])
def test_causal_nonfinite_values_never_reach_earlier_outputs_or_their_gradients(backend, case):
    """An inf or NaN value at position j reaches outputs from j on only, also inside j's own
    chunk (1.1.4's cumulative sums behave so; a masked (t, t) matmul gives 0 * inf = NaN), and
    a loss on the earlier outputs gets the gradients it gets without them."""
    q, k, v = (t.to(DEVICE) for t in qkv(b=1, h=2, n=150, d=8))
    P = None if case.get("feature_map") == "none" else projection(12, 8).to(DEVICE)

    def run(v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention(*leaves, P, causal=True, backend=backend, **case)
        out[:, :, :140].square().sum().backward()
        return out.detach(), [t.grad for t in leaves]

    clean, clean_grads = run(v)
    v = v.clone()
    v[0, :, 140, 3], v[0, :, 141, 2], v[0, :, 145, 3] = float("inf"), float("nan"), float("-inf")
    out, grads = run(v)
    assert torch.allclose(out[:, :, :140], clean[:, :, :140], rtol=1e-5, atol=1e-6)
    assert torch.isposinf(out[0, :, 140:145, 3]).all() and torch.isnan(out[0, :, 145:, 3]).all()
    assert torch.isnan(out[0, :, 141:, 2]).all() and torch.isfinite(out[0, :, 140, 2]).all()
    for ours, theirs in zip(grads, clean_grads):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_eager_calls_skip_the_op_dispatch_with_the_same_numbers(causal):
    """Eager fused calls on plain tensors run ops._Eager (no torch.library dispatch: host
    time, bench/RESULTS.md); its outputs, saved states and gradients are the custom op's, bit for
    bit, and fake tensors (what torch.compile traces) still go through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.to(DEVICE).float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in qkv(b=2, h=3, n=37, d=8, e=6))
    P = projection(12, 8).to(DEVICE)
    grad = torch.randn(2, 3, 37, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results = []
    for fn in (ops.favor, favor_fwd):
        out = fn(q, k, v, P, causal, 0, causal, True)
        (out[0] * grad).sum().backward()
        results.append(([out[0].detach(), *out[1:5], *out[5]], [t.grad for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
        kind = type(out[0].grad_fn).__name__
        assert (kind == "_EagerBackward") == (fn is ops.favor), kind
    (outs_a, grads_a), (outs_b, grads_b) = results
    assert len(outs_a) == len(outs_b)
    for a, b in zip(outs_a + grads_a, outs_b + grads_b):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    with FakeTensorMode() as mode:
        fq, fk, fv, fP = (mode.from_tensor(t) for t in (q, k, v, P))
        fake = ops.favor(fq, fk, fv, fP, causal, 0, causal, True)
    assert fake[0].shape == (2, 3, 37, 6) and type(fake[0]).__name__ == "FakeTensor"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_calls_outside_plain_eager_mode():
    """What the eager path must leave to the op: torch.compile with dynamic shapes (SymInt head
    dims reach the launchers' cached configs), torch.jit.trace (traced sizes), and a double
    backward (the op's differentiable route: the same gradients as the PyTorch path's)."""
    q, k, v = (t.to(DEVICE).float() for t in qkv(b=1, h=2, n=37, d=8, e=6))
    P = projection(12, 8).to(DEVICE)

    def attend(q, k, v):
        return favor_attention(q, k, v, P, causal=True, backend="triton")

    compiled = torch.compile(attend, backend="eager", dynamic=True)
    for n in (37, 20):
        assert torch.equal(compiled(q[:, :, :n], k[:, :, :n], v[:, :, :n]), attend(q[:, :, :n], k[:, :, :n], v[:, :, :n]))
    traced = torch.jit.trace(attend, (q, k, v), check_trace=False)
    assert torch.equal(traced(q, k, v), attend(q, k, v))
    second = []
    for backend in ("triton", "torch"):
        leaf = q.clone().requires_grad_()
        out = favor_attention(leaf, k, v, P, causal=True, backend=backend)
        (dq,) = torch.autograd.grad(out.square().sum(), leaf, create_graph=True)
        dq.square().sum().backward()
        second.append(leaf.grad)
    # (fp32 with TF32 dots: element-wise, a few near-zero entries differ by a few percent)
    assert (second[0] - second[1]).norm() <= 5e-3 * second[1].norm()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "rearranged"])
def test_fakes_return_exactly_the_real_ops_strides(backend, causal, layout):
    """aot_autograd replays outputs from the fakes' strides: a fake that differs from the real op
    (rearranged q, k, v as models make them) corrupted the first compiled backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.to(DEVICE) for t in qkv(b=2, h=3, n=20, d=8, e=6))
    if layout == "rearranged":  # "b n (h d) -> b h n d" views
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    P = projection(12, 8).to(DEVICE)
    flags = (causal, 0, False, backend == "triton")
    fwd_args = (q, k, v, P, *flags)
    out = torch.ops.performer_triton.favor_fwd(*fwd_args)
    grad = torch.randn_like(out[0]).transpose(1, 2).contiguous().transpose(1, 2)
    bwd_args = (grad, q, k, v, P, *out, *flags)
    grads = torch.ops.performer_triton.favor_bwd(*bwd_args)
    with FakeTensorMode() as mode:
        def as_fake(args):
            fake = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
            return tuple([fake(t) for t in a] if isinstance(a, list) else fake(a) for a in args)

        fake_out = torch.ops.performer_triton.favor_fwd(*as_fake(fwd_args))
        fake_grads = torch.ops.performer_triton.favor_bwd(*as_fake(bwd_args))
    flat = lambda outputs: [t for o in outputs for t in (o if isinstance(o, list) else [o])]  # noqa: E731
    # saved states: the kernels' chunk states, the PyTorch path's chunk states and references
    # (causal) or context (non-causal)
    states = (5 if causal else 6) if backend == "triton" else (2 if causal else 1)
    assert len(flat(out)) == len(flat(fake_out)) == 5 + states
    for real, fake in zip(flat((*out, *grads)), flat((*fake_out, *fake_grads))):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_size_one_dims_with_any_stride(backend, causal):
    """d = 1, e = 1 and m = 1 arrive as views with a non-unit last stride (slices of wider
    tensors), which .contiguous() does not change."""
    q, k, v = (t.to(DEVICE) for t in qkv(b=1, h=2, n=9, d=3, e=3))
    q1, k1, v1 = q[..., 1:2], k[..., 1:2], v[..., 2:3]  # last stride 1 on a size-1 dim is not guaranteed
    q1, k1, v1 = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q1, k1, v1))
    assert q1.stride(-1) != 1
    P = projection(1, 1).to(DEVICE)
    out = favor_attention(q1, k1, v1, P, causal=causal, backend=backend)
    ref = reference.favor_attention(q1.double().cpu(), k1.double().cpu(), v1.double().cpu(), P.double().cpu(),
                                    causal=causal)
    # d = e = m = 1: each output is one TF32 product on the Triton path, no averaging of the
    # truncation errors of its two operands
    assert rel(out.cpu(), ref) <= (FP32_GRAD_BUDGET if backend == "triton" else 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU (run by bench/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("local_attn_heads,reversible", [(0, False), (1, False), (1, True)])
def test_cuda_autocast_trains_a_default_performer_lm(dtype, local_attn_heads, reversible):
    """torch.autocast("cuda") around 1.1.4's defaults (rotary on, causal): the Triton kernels run
    in the autocast dtype, loss and every gradient finite, close to the fp32 step."""
    from performer_triton import PerformerLM

    torch.manual_seed(0)
    model = PerformerLM(num_tokens=64, max_seq_len=128, dim=64, depth=2, heads=4, dim_head=16, causal=True,
                        local_attn_heads=local_attn_heads, local_window_size=16, reversible=reversible).cuda()
    x = torch.randint(0, 64, (2, 100), device="cuda")

    def step(autocast: bool):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x).transpose(1, 2).float(), x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.eval()  # no projection redraws between the two steps
    loss32, grads32 = step(False)
    loss, grads = step(True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert abs(loss.item() - loss32.item()) <= 2e-2 * abs(loss32.item())
    assert rel(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads32])) <= 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_second_order_gradients(backend, feature, causal):
    """create_graph backwards (forces trained as -dE/dx, gradient penalties) are exact: gradgradcheck
    in float64 on the public entry point, q, k and v one tensor in three roles plus a projection
    of it (q = x @ w, k = v = x: every role's gradient from its own path only).  Softmax features
    have a detached stabilizer, which the first-order gradient treats as a constant (1.1.4's
    semantics) while finite differences of that gradient move it: there the second order is
    checked against 1.1.4 (tests/test_call_patterns.py) and here the fused route against the
    PyTorch path."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    P = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    kernel = dict(feature_map=feature)

    def attend(x, w):
        return favor_attention(x @ w, x, x, P, causal=causal, backend="torch", **kernel)

    if feature == "relu":
        assert torch.autograd.gradgradcheck(attend, (x, w))
    if backend == "triton":  # the fused route (fp32: TF32 dots, emulated by the interpreter tests)
        xf, wf = (t.detach().float().to(DEVICE).requires_grad_() for t in (x, w))
        grads = []
        for route in ("triton", "torch"):
            out = favor_attention(xf @ wf, xf, xf, P.float().to(DEVICE), causal=causal, backend=route, **kernel)
            (dx,) = torch.autograd.grad(out.square().sum(), xf, create_graph=True)
            grads.append(torch.autograd.grad(dx.square().sum(), (xf, wf)))
        for a, b in zip(*grads):
            assert (a - b).norm() <= 5e-3 * b.norm()


@pytest.mark.parametrize("case", [dict(causal=True), dict(causal=True, key_stabilizer="prefix"),
                                  dict(causal=True, feature_map="relu"), dict(causal=False),
                                  dict(causal=False, feature_map="relu")],
                         ids=["causal-global", "causal-prefix", "causal-relu", "noncausal", "noncausal-relu"])
def test_second_order_gradients_across_chunks(monkeypatch, case):
    """create_graph through the PyTorch path over several chunks (causal: 8-row chunks in 64-row
    blocks; non-causal: 64-row chunks; n = 150) gives the float64 reference's second-order
    gradients (it once crashed there: an out= argument under autograd, and rows read back from a
    tensor that later chunks write, which n = 9 never reached)."""
    from performer_triton import torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK", 8)
    monkeypatch.setattr(torch_backend, "FEATURE_TILE", 64 * 2 * 7)  # 64 rows at b h = 2, m = 7
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 150, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    P = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    results = []
    for attention in (partial(favor_attention, backend="torch"), reference.favor_attention):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = attention(xl @ wl, xl, xl, P, **case)
        (dx,) = torch.autograd.grad(out.square().sum(), xl, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (xl, wl)))
    for a, b in zip(*results):
        assert (a - b).norm() <= 1e-10 * b.norm()


@pytest.mark.parametrize("kw", [dict(key_padding_mask=True), dict(feature_map="none"), dict(feature_map="none", causal=True),
                                dict(feature_map=torch.nn.Softplus())])
def test_features_made_in_pytorch_under_cpu_autocast(kw):
    """Under torch.autocast (bf16) the inputs are bf16, the features made in fp32 with autocast off
    (this recursed without end once: the fp32 call was cast back by autocast), the output bf16."""
    q, k, v = qkv(b=1, h=2, n=8, d=8, seed=7)
    P = projection(12, 8)
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 6:] = False
    kw = dict(kw, key_padding_mask=keep) if "key_padding_mask" in kw else kw
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = favor_attention(q, k, v, P, **kw)
    ref = favor_attention(*(t.bfloat16() for t in (q, k, v)), P, **kw)  # (autocast leaves P fp32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)



@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("key_stabilizer", ["global", "prefix"])
def test_bf16_causal_chunks_of_128_rows_through_the_public_api(key_stabilizer):
    """bf16 heads of 64 with the global stabilizer run the causal kernels in chunks of 128 rows
    (kernels.causal._long_chunks; the prefix stabilizer keeps 64): favor_attention(backend=
    "triton") on the rearranged views a model makes, n = 257 (three chunks, the last of one row),
    forward and backward through the op (its saved states), near float64 on the same bf16 inputs."""
    from performer_triton.kernels import causal as C
    assert C._long_chunks(64, 64, torch.bfloat16, prefix=key_stabilizer == "prefix", state=False) == (
        key_stabilizer == "global")
    b, h, n, d = 1, 2, 257, 64
    g = torch.Generator().manual_seed(11)
    x = torch.randn(b, n, 3 * h * d, generator=g).bfloat16().double()  # representable in bf16
    q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in x.chunk(3, dim=-1))  # (b, h, n, d) views
    P = projection(100, d).bfloat16().double()
    w = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = reference.favor_attention(*ref_leaves, P, causal=True, key_stabilizer=key_stabilizer)
    (ref * w).sum().backward()
    xb = x.bfloat16().to(DEVICE).requires_grad_()
    qb, kb, vb = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in xb.chunk(3, dim=-1))
    assert not qb.is_contiguous()
    out = favor_attention(qb, kb, vb, P.bfloat16().to(DEVICE), causal=True, key_stabilizer=key_stabilizer,
                          backend="triton")
    (out.double().cpu() * w).sum().backward()
    assert out.dtype == torch.bfloat16 and rel(out.double().cpu(), ref) <= BUDGET[torch.bfloat16]
    dx = torch.cat([t.grad.transpose(1, 2).flatten(2) for t in ref_leaves], -1)
    assert torch.isfinite(xb.grad).all() and rel(xb.grad.double().cpu(), dx) <= BUDGET[torch.bfloat16]
