"""Subclasses of the library's modules that override a method with performer-pytorch 1.1.4's
signature, used inside the library's own layers (public programs subclass FastAttention:
geowatch's FastMultiheadSelfAttention, graph-coder's FastAttention with its own forward).
1.1.4 calls ``fast_attention(q, k, v)`` from Attention and
``fast_attention.redraw_projection_matrix(device)`` from ProjectionUpdater: overrides with exactly
those parameters keep working, with 1.1.4's numbers. Generation never bypasses such an override:
a cached step updates an attention state instead of calling forward, so the default recomputes
(1.1.4's tokens), and so does ``use_cache=True``, with a one-time warning saying why.
"""
import pytest
import torch
from local_attention import LocalAttention

from common import ORIGINAL, OURS, same_results, tokens
from performer_triton import validation as _validation


def _scaled(lib):
    class ScaledFastAttention(lib.module.FastAttention):
        def forward(self, q, k, v):  # 1.1.4's signature
            return super().forward(q * 0.5, k * 0.5, v)

    return ScaledFastAttention


def _forward_override(lib):
    torch.manual_seed(0)
    attn = lib.module.SelfAttention(dim=8, heads=2, dim_head=4, nb_features=6).double()
    attn.fast_attention = _scaled(lib)(4, 6).double()
    return attn(torch.randn(2, 5, 8, dtype=torch.float64))


def test_forward_override_with_1_1_4_signature_inside_self_attention():
    theirs = _forward_override(ORIGINAL)
    ours = _forward_override(OURS)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _redraw_override(lib):
    redraws = []

    class LoggedFastAttention(lib.module.FastAttention):
        def redraw_projection_matrix(self, device):  # 1.1.4's signature
            redraws.append(torch.device(device).type)
            super().redraw_projection_matrix(device)

    torch.manual_seed(0)
    model = lib.module.Performer(dim=8, depth=1, heads=2, dim_head=4, nb_features=6, feature_redraw_interval=1)
    for module in model.modules():
        if isinstance(module, lib.performer_pytorch.SelfAttention):
            module.fast_attention = LoggedFastAttention(4, 6)
    outs = [model(torch.randn(1, 5, 8)) for _ in range(3)]
    return redraws, outs, [m.projection_matrix for m in model.modules() if hasattr(m, "projection_matrix")]


def test_redraw_override_with_1_1_4_signature_under_projection_updater():
    theirs = _redraw_override(ORIGINAL)
    ours = _redraw_override(OURS)
    assert ours[0] == theirs[0] == ["cpu"]
    for a, b in zip(ours[1] + ours[2], theirs[1] + theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _lm_with_override(lib, local: bool):
    """A causal PerformerLM (one layer: a cache would be exact for the plain model) whose global
    attention, or local attention, is a subclass with a forward of its own."""
    torch.manual_seed(0)
    lm = lib.module.PerformerLM(num_tokens=20, max_seq_len=32, dim=16, depth=1, heads=2, dim_head=8, causal=True,
                                nb_features=8, local_attn_heads=1 if local else 0, local_window_size=4)
    for module in lm.modules():
        if not isinstance(module, lib.performer_pytorch.SelfAttention):
            continue
        if local:
            class Sharper(LocalAttention):
                def forward(self, q, k, v, **kwargs):
                    return super().forward(q * 2.0, k, v, **kwargs)

            module.local_attn = Sharper(window_size=4, causal=True, autopad=True, dropout=0.0, look_forward=0,
                                        rel_pos_emb_config=(8, 1))
        else:
            old = module.fast_attention
            module.fast_attention = _scaled(lib)(8, 8, causal=True)
            module.fast_attention.projection_matrix.copy_(old.projection_matrix)
    return lm.double()


@pytest.mark.parametrize("local", [False, True], ids=["fast_attention", "local_attn"])
def test_generation_calls_an_overridden_forward(local):
    def program(lib, rec):
        lm = _lm_with_override(lib, local)
        wrapper = lib.autoregressive_wrapper.AutoregressiveWrapper(lm)
        prime = tokens((2, 3), 20, 1, low=1)
        torch.manual_seed(1)
        rec.log("tokens", wrapper.generate(prime, 10, filter_thres=0.5))
        rec.log("logits", lm(torch.cat([prime, tokens((2, 9), 20, 2, low=1)], 1)))

    same_results(program)
    wrapper = OURS.autoregressive_wrapper.AutoregressiveWrapper(_lm_with_override(OURS, local))
    assert wrapper.cache_unsupported_reason() is not None
    _validation._WARNED.clear()
    torch.manual_seed(1)
    recomputed = wrapper.generate(tokens((2, 3), 20, 1, low=1), 4)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="'use_cache=True' is ignored \\(cached generation would not be exact here: .*"
                                         "forward of its own"):
        assert torch.equal(wrapper.generate(tokens((2, 3), 20, 1, low=1), 4, use_cache=True), recomputed)


def test_create_projection_replaced_by_a_function_of_1_1_4s_signature():
    """``fast_attention.create_projection`` is a plain attribute in 1.1.4 (a partial of
    gaussian_orthogonal_random_matrix); a program may set its own, called with ``device=`` only."""

    def program(lib, rec):
        torch.manual_seed(0)
        model = lib.module.Performer(dim=8, depth=2, heads=2, dim_head=4, nb_features=6, feature_redraw_interval=1)
        for module in model.modules():
            if isinstance(module, lib.module.FastAttention):
                def draw(device=None):  # ortho_scaling=1 rows, drawn from the global generator
                    return lib.performer_pytorch.gaussian_orthogonal_random_matrix(6, 4, scaling=1, device=device)

                module.create_projection = draw
        model.double()
        for step in range(3):
            rec.log("out", model(torch.randn(1, 5, 8, dtype=torch.float64)))
            rec.log("projections", [m.projection_matrix.clone() for m in model.modules()
                                    if isinstance(m, lib.module.FastAttention)])

    theirs, _ = same_results(program)
    norms = theirs.rec.entries["projections"][-1][0].norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 2.0), rtol=1e-5, atol=0)  # sqrt(nb_columns): scaling=1's rows


def test_compiled_attention_modules_keep_the_cache():
    """torch.compile(fast_attention) or a compiled forward of local_attn's own is not a forward
    of the program's: generation still decodes from the cache."""
    lm = OURS.module.PerformerLM(num_tokens=20, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8, causal=True,
                                 nb_features=8, local_attn_heads=1, local_window_size=4, key_stabilizer="prefix")
    layers = [m for m in lm.modules() if isinstance(m, OURS.performer_pytorch.SelfAttention)]
    layers[0].fast_attention = torch.compile(layers[0].fast_attention)
    layers[1].local_attn.forward = torch.compile(layers[1].local_attn.forward)
    wrapper = OURS.autoregressive_wrapper.AutoregressiveWrapper(lm)
    assert wrapper.cache_unsupported_reason() is None
    layers[1].local_attn.forward = torch.compile(lambda q, k, v, **kw: q)  # someone else's forward
    assert "forward of its own" in wrapper.cache_unsupported_reason()
