"""A Performer re-assembled from performer-pytorch 1.1.4's building blocks, from a public
repository found through a code search (code index file 41987737756; the index names no
repository). It imports ``PreLayerNorm, FeedForward, PreScaleNorm, ReZero, cast_tuple, Chunk,
PreShiftTokens, CrossAttention, ReversibleSequence, SequentialSequence, ProjectionUpdater,
default, FastAttention, exists, rearrange, empty, apply_rotary_pos_emb`` from
``performer_pytorch.performer_pytorch`` and writes its own ``Attention`` (``FastAttention`` for
the global heads after ``v.masked_fill_`` on their head slice, its own sliding ``WindowAttention``
with sinusoidal rotary positions for the local heads), a ``SelfAttention`` over it, and 1.1.4's
``Performer`` constructor around them (its own module-level ``apply_rotary_pos_emb`` shadows the
imported one).

Kept: those classes, every constructor branch the program has (local heads per layer, shift
tokens, GLU / chunked feed-forwards, reversible, cross attention with a context mask, ReZero,
ScaleNorm, generalized attention, no_projection, bias choices), the key mask routed as ``mask``,
``ProjectionUpdater`` redrawing at interval 2. Changed: the program's embedding is a random input
that takes gradients. Shrunk: dim 16, 2 layers, 4 heads of 8, window 5 (the windowed path at 20
tokens, the dense path at 4), 6 context tokens, 3 Adam steps, then eval and a reload of the
state_dict into a fresh model; float64.
"""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from einops import pack
from torch import einsum, nn

from common import changed, same_results


def compl_mod(m, n):
    return int(n * math.ceil(m / n) - m)


def build(lib):
    pp = lib.performer_pytorch
    default, exists, rearrange, empty = pp.default, pp.exists, pp.rearrange, pp.empty
    assert callable(pp.apply_rotary_pos_emb)  # imported, then shadowed below

    class SinusoidalEmbeddings(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

        def forward(self, x):
            freqs = torch.einsum("i , j -> i j", torch.arange(x.shape[-2]).type_as(self.inv_freq), self.inv_freq)
            return torch.cat((freqs, freqs), dim=-1)

    def rotate_half(x):
        x1, x2 = rearrange(x, "b ... (r d) -> b (...) r d", r=2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    def apply_rotary_pos_emb(q, k, freqs):
        return tuple((t * freqs.cos()) + (rotate_half(t) * freqs.sin()) for t in (q, k))

    class WindowAttention(nn.Module):
        def __init__(self, window, dim, dropout=0.1):
            super().__init__()
            self.softmax, self.dropout = nn.Softmax(dim=-1), nn.Dropout(dropout)
            self.w, self.k_ch, self.q_ch = int((window - 1) / 2), window * 2, window + 1
            u = torch.triu(torch.full((self.q_ch, self.k_ch), True))
            self.mask = ~torch.logical_and(u, torch.flip(u, [0, 1]))
            self.mask_k_left = torch.clone(self.mask)
            self.mask_k_left[:, : self.w] = True
            self.rel_pos = SinusoidalEmbeddings(dim)

        def forward(self, q, k, v, input_mask):
            b, nh, s, h = k.shape
            (q, _), (k, _), (v, _) = map(lambda t: pack([t], "* n d"), (q * (h**-0.5), k, v))
            q, k = apply_rotary_pos_emb(q, k, self.rel_pos(q))
            if s < self.w * 2.5:  # dense band
                A = torch.einsum("b q h, b k h -> b q k", q, k)
                u = torch.triu(torch.full(A.shape[-2:], True), -self.w)
                A[:].masked_fill_(~torch.logical_and(u, torch.flip(u, [0, 1])), -torch.finfo(A.dtype).max)
                return torch.einsum("b q k, b k h -> b q h", self.dropout(self.softmax(A)), v).view(b, nh, -1, h)
            q_pad, k_pad = compl_mod(s, self.q_ch), compl_mod((s + self.w * 2) - self.k_ch, self.q_ch)
            q = F.pad(q, (0,) * 3 + (q_pad,)).unfold(1, self.q_ch, self.q_ch)
            k, v = (F.pad(t, (0,) * 2 + (self.w, self.w + k_pad)).unfold(1, self.k_ch, self.q_ch) for t in (k, v))
            A = einsum("b c h q, b c h k -> b c q k ", q, k)
            mask_k_right = torch.clone(self.mask)
            mask_k_right[:, -(self.w + k_pad):] = True
            if q.shape[1] > 1:
                mask = torch.stack([self.mask_k_left] + [self.mask] * (q.shape[1] - 2) + [mask_k_right])
            else:
                mask = torch.logical_or(self.mask_k_left, mask_k_right)
            A[:].masked_fill_(mask, -torch.finfo(A.dtype).max)
            A = self.dropout(self.softmax(A))
            return einsum("b c q k, b c h k -> b c q h", A, v).view(b, nh, -1, h)[:, :, :s]

    class Attention(nn.Module):
        def __init__(self, dim, causal=False, heads=8, dim_head=64, local_heads=0, local_window_size=256,
                     nb_features=None, feature_redraw_interval=1000, generalized_attention=False,
                     kernel_fn=nn.ReLU(), dropout=0.0, no_projection=False, qkv_bias=False, attn_out_bias=True):
            super().__init__()
            dim_head = default(dim_head, dim // heads)
            inner_dim = dim_head * heads
            self.fast_attention = pp.FastAttention(dim_head, nb_features, causal=causal, kernel_fn=kernel_fn,
                                                   generalized_attention=generalized_attention,
                                                   no_projection=no_projection)
            self.heads, self.global_heads = heads, heads - local_heads
            self.local_attn = WindowAttention(window=local_window_size, dim=dim_head, dropout=0.10)
            self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner_dim, bias=qkv_bias) for _ in range(3))
            self.to_out = nn.Linear(inner_dim, dim, bias=attn_out_bias)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x, pos_emb=None, context=None, mask=None, context_mask=None, **kwargs):
            h, gh, cross_attend = self.heads, self.global_heads, exists(context)
            context = default(context, x)
            context_mask = default(context_mask, mask) if not cross_attend else context_mask
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (self.to_q(x), self.to_k(context),
                                                                            self.to_v(context)))
            (q, lq), (k, lk), (v, lv) = ((t[:, :gh], t[:, gh:]) for t in (q, k, v))
            attn_outs = []
            if not empty(q):
                if exists(context_mask):
                    v.masked_fill_(~context_mask[:, None, :, None], 0.0)
                if exists(pos_emb) and not cross_attend:
                    q, k = apply_rotary_pos_emb(q, k, pos_emb)
                attn_outs.append(self.fast_attention(q, k, v))
            if not empty(lq):
                attn_outs.append(self.local_attn(lq, lk, lv, input_mask=mask))
            return self.dropout(self.to_out(rearrange(torch.cat(attn_outs, dim=1), "b h n d -> b n (h d)")))

    class SelfAttention(Attention):
        def forward(self, *args, context=None, **kwargs):
            assert not exists(context)
            return super().forward(*args, **kwargs)

    class Performer(nn.Module):
        def __init__(self, dim, depth, heads, dim_head, local_attn_heads=0, local_window_size=256, causal=False,
                     ff_mult=4, nb_features=None, feature_redraw_interval=1000, reversible=False, ff_chunks=1,
                     generalized_attention=False, kernel_fn=nn.ReLU(), use_scalenorm=False, use_rezero=False,
                     ff_glu=False, ff_dropout=0.0, attn_dropout=0.0, cross_attend=False, no_projection=False,
                     auto_check_redraw=True, qkv_bias=True, attn_out_bias=True, shift_tokens=False):
            super().__init__()
            layers = nn.ModuleList([])
            local_attn_heads = pp.cast_tuple(local_attn_heads)
            local_attn_heads = local_attn_heads * depth if len(local_attn_heads) == 1 else local_attn_heads
            wrapper_fn = partial(pp.PreScaleNorm, dim) if use_scalenorm else (
                pp.ReZero if use_rezero else partial(pp.PreLayerNorm, dim))
            attn_kw = dict(heads=heads, dim_head=dim_head, nb_features=nb_features, kernel_fn=kernel_fn,
                           generalized_attention=generalized_attention, dropout=attn_dropout,
                           no_projection=no_projection, qkv_bias=qkv_bias, attn_out_bias=attn_out_bias)

            def feed_forward():
                return pp.Chunk(ff_chunks, pp.FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=ff_glu), along_dim=1)

            for _, local_heads in zip(range(depth), local_attn_heads):
                attn = SelfAttention(dim, causal=causal, local_heads=local_heads, local_window_size=local_window_size,
                                     **attn_kw)
                ff = feed_forward()
                if shift_tokens:
                    shift = (0, 1) if causal else (-1, 0, 1)
                    attn, ff = (pp.PreShiftTokens(shift, t) for t in (attn, ff))
                layers.append(nn.ModuleList([wrapper_fn(attn), wrapper_fn(ff)]))
                if cross_attend:
                    layers.append(nn.ModuleList([wrapper_fn(pp.CrossAttention(dim, **attn_kw)),
                                                 wrapper_fn(feed_forward())]))
            execute_type = pp.ReversibleSequence if reversible else pp.SequentialSequence
            route_attn = ((True, False),) * depth * (2 if cross_attend else 1)
            route_context = ((False, False), (True, False)) * depth
            context_route_map = {"context": route_context, "context_mask": route_context} if cross_attend else {}
            self.net = execute_type(layers, args_route={"mask": route_attn, "pos_emb": route_attn, **context_route_map})
            self.auto_check_redraw = auto_check_redraw
            self.proj_updater = pp.ProjectionUpdater(self.net, feature_redraw_interval)

        def forward(self, x, **kwargs):
            if self.auto_check_redraw:
                self.proj_updater.redraw_projections()
            return self.net(x, **kwargs)

    return Performer


CONFIGS = {
    "local heads per layer, shift, GLU, chunks": dict(local_attn_heads=(2, 1), shift_tokens=True, ff_glu=True,
                                                      ff_chunks=2, attn_dropout=0.1, ff_dropout=0.1),
    "reversible, cross, ReZero": dict(local_attn_heads=1, reversible=True, cross_attend=True, use_rezero=True,
                                      nb_features=12, attn_dropout=0.1),
    "ScaleNorm, generalized, reversible": dict(local_attn_heads=0, use_scalenorm=True, generalized_attention=True,
                                               kernel_fn=nn.Softplus(), shift_tokens=True, reversible=True),
    "no_projection, cross": dict(local_attn_heads=2, cross_attend=True, no_projection=True, qkv_bias=False),
}


def program(lib, rec, config, n):
    torch.manual_seed(7)
    Performer = build(lib)
    model = Performer(16, 2, 4, 8, local_window_size=5, feature_redraw_interval=2, **config).double()
    rec.log("state_dict", [(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    rec.projections("projections", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(2, n, 16, dtype=torch.float64).requires_grad_()
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, -2:] = False
    kwargs = dict(mask=mask)
    if config.get("cross_attend"):
        context_mask = torch.ones(2, 6, dtype=torch.bool)
        context_mask[0, -1] = False
        kwargs.update(context=torch.randn(2, 6, 16, dtype=torch.float64), context_mask=context_mask)
    for _ in range(3):
        out = model(x, **kwargs)
        loss = out.pow(2).mean()
        loss.backward()
        rec.log("output", out)
        rec.log("loss", loss)
        rec.log("input gradient", x.grad)
        x.grad = None
        rec.optimizer_step(optimizer, model)
    model.eval()
    with torch.no_grad():
        rec.log("eval output", model(x, **kwargs))
    fresh = Performer(16, 2, 4, 8, local_window_size=5, feature_redraw_interval=2, **config).double()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        rec.log("reloaded output", fresh(x, **kwargs))


@pytest.mark.parametrize("n", [20, 4])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_window_attention_performer_trains_as_performer_pytorch(config, n):
    theirs, ours = same_results(partial(program, config=CONFIGS[config], n=n))
    assert changed(theirs.rec.entries["projections"]), "the third forward redraws (interval 2)"
    torch.testing.assert_close(theirs.rec.entries["reloaded output"][0], theirs.rec.entries["eval output"][0],
                               rtol=0, atol=0)
    assert not ours.warnings
