"""Padded positions never reach kept outputs: any key mask with the prefix stabilizer (each
sequence without its padding), NaN / inf at padded positions with 1.1.4's masking and with
exact_mask, through the global and the local heads, and generation whose window slides over a
padded prompt."""
import pytest
import torch

from performer_triton import AutoregressiveWrapper, PerformerLM, favor_attention, gaussian_orthogonal_random_matrix
from performer_triton import reference
from performer_triton.performer_pytorch import Performer, SelfAttention
from conftest import DEVICE, HAS_TRITON

def keep_mask(kind: str, b: int, s: int) -> torch.Tensor:
    keep = torch.ones(b, s, dtype=torch.bool)
    if kind == "left":
        keep[1, :10] = False
        keep[2, : s - 1] = False  # one kept key
    elif kind == "holes":
        keep[0, 3] = keep[0, s - 7] = False
        keep[2, ::3] = False
    elif kind == "right":
        keep[1, 20:] = False
    elif kind == "none kept":
        keep[1] = False
    return keep


CASES = [("torch", n, kind) for n in (37, 9) for kind in ("left", "holes", "right", "none kept")]
if HAS_TRITON:  # the interpreter is slow: the compaction and the right-padding call, once each
    CASES += [("triton", 37, "holes"), ("triton", 9, "right")]


@pytest.mark.parametrize("backend, n, kind", CASES)
def test_prefix_with_a_key_mask_is_each_sequence_without_its_padding(backend, n, kind):
    """key_stabilizer="prefix" with any key_padding_mask: the kept queries' outputs and every
    gradient are those of the batch row with its padded positions taken out; queries at padded
    positions give 0; NaN / inf at padded positions reach nothing (fp64 on the PyTorch path)."""
    b, h, s, d, e, m = 3, 2, 37, 13, 7, 23
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, rows, dim, generator=g, dtype=dtype) for rows, dim in ((n, d), (s, d), (s, e)))
    k = 1.5 * k
    P = gaussian_orthogonal_random_matrix(m, d, generator=g).to(dtype)
    keep = keep_mask(kind, b, s)
    keep_q = keep[:, s - n:]
    k = k.masked_fill(~keep[:, None, :, None], float("nan"))
    v = v.masked_fill(~keep[:, None, :, None], float("inf"))
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    kw = dict(causal=True, key_stabilizer="prefix", backend=backend)
    out = favor_attention(q, k, v, P.to(DEVICE), key_padding_mask=keep.to(DEVICE), **kw)
    weight = torch.randn(out.shape, generator=g, dtype=dtype).to(DEVICE)
    (out * weight).sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (out.detach().cpu()[~keep_q[:, None, :, None].expand(-1, h, -1, e)] == 0).all()
    budget = 1e-12 if dtype == torch.float64 else 2e-5
    for i in range(b):
        kq, kk = keep_q[i].nonzero()[:, 0].to(DEVICE), keep[i].nonzero()[:, 0].to(DEVICE)
        if not kq.numel():
            assert (q.grad[i] == 0).all() and (k.grad[i] == 0).all() and (v.grad[i] == 0).all()
            continue
        rows = [t[i : i + 1, :, idx].detach().requires_grad_() for t, idx in ((q, kq), (k, kk), (v, kk))]
        alone = favor_attention(*rows, P.to(DEVICE), **kw)
        (alone * weight[i : i + 1, :, kq]).sum().backward()
        scale = alone.abs().max()
        assert (out[i : i + 1, :, kq] - alone).abs().max() <= budget * scale
        for full, part, idx in ((q.grad, rows[0].grad, kq), (k.grad, rows[1].grad, kk), (v.grad, rows[2].grad, kk)):
            assert (full[i : i + 1, :, idx] - part).abs().max() <= budget * part.abs().max().clamp_min(1.0)
        padded = torch.ones(s, dtype=torch.bool, device=DEVICE)
        padded[kk] = False
        assert (k.grad[i, :, padded] == 0).all() and (v.grad[i, :, padded] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["holes", "right", "none kept"])
def test_global_stabilizer_key_mask_selects_nan_padding(causal, kind):
    """The global stabilizer with a key_padding_mask: NaN / inf at padded keys (and, causal, at the
    padded queries, which share the keys' positions and give 0) change no kept output or gradient:
    the same call with zeros there gives the same numbers, and padded rows get zero gradients."""
    b, h, n, d, e, m = 3, 2, 37, 13, 7, 23
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, dim, generator=g, dtype=torch.float64) for dim in (d, d, e))
    P = gaussian_orthogonal_random_matrix(m, d, generator=g).to(torch.float64)
    keep = keep_mask(kind, b, n)
    rows = keep[:, None, :, None]
    weight = torch.randn(b, h, n, e, generator=g, dtype=torch.float64)
    if causal:
        weight = weight.masked_fill(~rows, 1.0)  # the padded rows' zeros must not depend on the loss

    def run(pad_q, pad_k, pad_v):
        q_, k_, v_ = (t.masked_fill(~rows, fill).requires_grad_()
                      for t, fill in ((q, pad_q), (k, pad_k), (v, pad_v)))
        out = favor_attention(q_, k_, v_, P, causal=causal, key_padding_mask=keep)
        (out * weight).sum().backward()
        return out, q_.grad, k_.grad, v_.grad

    clean = run(0.0, 0.0, 0.0)
    poisoned = run(float("nan") if causal else 0.0, float("nan"), float("inf"))
    for a, p in zip(clean, poisoned):
        assert torch.isfinite(p).all()
        assert (a - p).abs().max() <= 1e-12 * a.abs().max().clamp_min(1.0)
    out, dq, dk, dv = poisoned
    assert (dk.masked_select(~rows) == 0).all() and (dv.masked_select(~rows) == 0).all()
    if causal:
        assert (out.masked_select(~rows) == 0).all() and (dq.masked_select(~rows) == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_the_global_key_stabilizer_takes_the_max_over_kept_keys_only(causal):
    """Every kept key's dash below 0: padded keys (whose zeroed rows have a dash of 0) must not
    set the global stabilizer, or the kept keys' eps share changes: the masked call equals the
    call on the kept keys alone (review R36: a stabilizer over every key went uncaught where random
    keys have a positive kept max)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 6, 1, generator=g, dtype=torch.float64)
    k = -2.0 - torch.rand(1, 1, 6, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 6, 3, generator=g, dtype=torch.float64)
    P = torch.ones(1, 1, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True, False, True]]) if not causal else \
        torch.tensor([[True, True, True, True, False, False]])
    out = favor_attention(q, k, v, P, causal=causal, key_padding_mask=keep)
    idx = keep[0].nonzero()[:, 0]
    # (non-causal: every query against the kept keys; causal: the kept prefix is the sequence)
    alone = favor_attention(q if not causal else q[:, :, idx], k[:, :, idx], v[:, :, idx], P, causal=causal)
    kept = out[:, :, idx] if causal else out
    assert (kept - alone).abs().max() <= 1e-12 * alone.abs().max()


@pytest.mark.parametrize("n", [37, 9])
def test_the_reference_prefix_mask_is_each_sequence_without_its_padding(n):
    """The oracle itself (quadratic form, masks by selection) against its unmasked calls."""
    b, h, s, d, e, m = 3, 2, 37, 8, 5, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, rows, dim, generator=g, dtype=torch.float64) for rows, dim in ((n, d), (s, d), (s, e)))
    P = gaussian_orthogonal_random_matrix(m, d, generator=g).double()
    keep = keep_mask("holes", b, s)
    out = reference.favor_attention(q, k, v, P, causal=True, key_stabilizer="prefix", key_padding_mask=keep)
    for i in range(b):
        kq, kk = keep[i, s - n:].nonzero()[:, 0], keep[i].nonzero()[:, 0]
        alone = reference.favor_attention(q[i : i + 1, :, kq], k[i : i + 1, :, kk], v[i : i + 1, :, kk], P,
                                          causal=True, key_stabilizer="prefix")
        assert (out[i : i + 1, :, kq] - alone).abs().max() <= 1e-13 * alone.abs().max()


def nan_padded(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~keep[..., None], float("nan"))


@pytest.mark.parametrize("exact_mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local_heads", [0, 1, 3])
def test_nan_at_padded_positions_reaches_no_kept_output(exact_mask, causal, local_heads):
    """SelfAttention with a mask, global and local heads: NaN inputs at padded positions give the
    kept outputs of zero inputs there.  With 1.1.4's masking (exact_mask=False) padded keys still
    count in the normaliser (its numbers): a padded position with NaN input counts as a zero input."""
    torch.manual_seed(0)
    layer = SelfAttention(24, heads=3, dim_head=8, causal=causal, local_heads=local_heads, local_window_size=4,
                          exact_mask=exact_mask).double().eval()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, 2] = False
    zeros = x.masked_fill(~keep[..., None], 0.0)
    with torch.no_grad():
        clean, poisoned = layer(zeros, mask=keep), layer(nan_padded(x, keep), mask=keep)
    assert torch.isfinite(poisoned[keep]).all()
    assert (poisoned[keep] - clean[keep]).abs().max() <= 1e-12 * clean[keep].abs().max()
    # and the gradients of a loss on the kept outputs at the kept inputs (the NaN rows are selected
    # away before any weight: no 0 x NaN in the backward either)
    grads = []
    for inputs in (zeros, nan_padded(x, keep)):
        inputs = inputs.clone().requires_grad_()
        (grad,) = torch.autograd.grad(layer(inputs, mask=keep)[keep].square().sum(), inputs)
        grads.append(grad[keep])
    assert torch.isfinite(grads[1]).all()
    assert (grads[1] - grads[0]).abs().max() <= 1e-10 * grads[0].abs().max()


@pytest.mark.parametrize("exact_mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_rows_that_overflow_in_the_projections_reach_no_kept_gradient(exact_mask, causal):
    """fp16 padded rows of x ~ 6e4 are finite, but overflow in to_q / to_k / to_v: the non-finite
    padded rows of q, k, v are selected away as non-finite inputs are (a padded query's inf
    features times its zero gradient were NaN in every key's gradient, non-causal exact_mask)."""
    torch.manual_seed(0)
    layer = SelfAttention(24, heads=3, dim_head=8, nb_features=16, causal=causal, exact_mask=exact_mask).half()
    x = torch.randn(2, 10, 24, generator=torch.Generator().manual_seed(0)).half()
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, 2] = False
    results = []
    for fill in (0.0, 6e4):
        inputs = x.masked_fill(~keep[..., None], fill).requires_grad_()
        layer.zero_grad()
        out = layer(inputs, mask=keep)
        out[keep].float().square().sum().backward()
        results.append([out[keep], inputs.grad[keep], *(p.grad for p in layer.parameters())])
    assert torch.isinf(layer.to_q(torch.full((24,), 6e4).half())).any()  # (the overflow is real)
    for clean, huge in zip(*results):
        assert torch.isfinite(huge).all()
        if exact_mask:  # padded positions take no part: fill 0's numbers (1.1.4's masking counts an
            # overflowed padded key as a zero key, a fill-0 one as the bias of to_k)
            assert torch.allclose(huge.float(), clean.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kw", [dict(causal=False), dict(causal=True, local_attn_heads=1),
                                dict(causal=False, exact_mask=True, shift_tokens=True),
                                dict(causal=True, key_stabilizer="prefix", exact_mask=True, ff_glu=True)])
def test_nan_at_padded_positions_reaches_no_kept_gradient_through_a_stack(kw):
    """A Performer stack (attention and feed-forward, residuals, depth 2) with NaN inputs at padded
    positions: the kept outputs, the kept inputs' gradients and every weight's gradient of a loss
    on the kept outputs equal those of zero inputs there (the residual stream is selected at the
    entry: a NaN row's feed-forward backward would send 0 x NaN into attention's padded queries)."""
    torch.manual_seed(0)
    model = Performer(dim=24, depth=2, heads=3, dim_head=8, nb_features=16, **kw).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, 2] = False
    results = []
    for inputs in (x.masked_fill(~keep[..., None], 0.0), nan_padded(x, keep)):
        inputs = inputs.clone().requires_grad_()
        model.zero_grad()
        out = model(inputs, mask=keep)
        out[keep].square().sum().backward()
        results.append([out[keep], inputs.grad[keep], *(p.grad for p in model.parameters() if p.grad is not None)])
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        assert (poisoned - clean).abs().max() <= 1e-10 * clean.abs().max().clamp_min(1e-30)


def test_nan_padded_keys_with_1_1_4_masking_keep_finite_padded_keys_numbers():
    """The zero-key substitute touches only non-finite padded keys: finite padded positions keep
    1.1.4's numbers (the padded row differs from the row alone, as 1.1.4's does)."""
    torch.manual_seed(0)
    layer = SelfAttention(24, heads=3, dim_head=8).double().eval()
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 7:] = False
    with torch.no_grad():
        padded, alone = layer(x, mask=keep)[0, :7], layer(x[:, :7])[0]
        zeros = layer(x.masked_fill(~keep[..., None], 0.0), mask=keep)[0, :7]
    assert (padded - alone).abs().max() > 1e-4 and (padded - zeros).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["left", "holes"])
def test_exact_mask_prefix_model_takes_any_padding(kind):
    """exact_mask + key_stabilizer="prefix" with left padding or holes (this used to raise): the
    kept logits do not depend on the tokens at padded positions, global and local heads."""
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=40, max_seq_len=48, dim=24, depth=2, heads=3, dim_head=8, nb_features=20,
                        causal=True, key_stabilizer="prefix", exact_mask=True, local_attn_heads=(0, 1),
                        local_window_size=8).double().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 40, (3, 37), generator=gen)
    keep = keep_mask(kind, 3, 37)
    other = torch.where(keep, x, torch.randint(0, 40, (3, 37), generator=gen))
    with torch.no_grad():
        a, b = model(x, mask=keep), model(other, mask=keep)
    assert torch.isfinite(a[keep]).all()
    assert (a[keep] - b[keep]).abs().max() <= 1e-12 * a[keep].abs().max()


def test_generation_slides_over_a_padded_prompt_with_exact_mask_and_prefix():
    """A right-padded prompt has holes once tokens are appended; past max_seq_len generation
    recomputes its window with them: the same tokens cached and recomputed, for every row."""
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=40, max_seq_len=12, dim=24, depth=2, heads=3, dim_head=8, causal=True,
                        key_stabilizer="prefix", exact_mask=True).double().eval()
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(wrapper.generate(prompt, 15, mask=mask, use_cache=use_cache))
    assert runs[0].shape == (2, 15) and torch.equal(runs[0], runs[1])
