"""lucidrains/omninet-pytorch, omninet_pytorch/omninet_pytorch.py: OmniNet, where every other
layer attends over the tokens of all previous layers with performer-pytorch's SelfAttention
(``from performer_pytorch import SelfAttention as PerformerAttention``) and max-pools them back.

Kept: the Omninet module (full-attention pre-norm blocks with dropout, the PerformerAttention
``(dim=dim, heads=heads, dim_head=dim_head)`` on the (b, n * layers, d) stack of hidden states
with the repeated ``pool_attn_mask``, max_pool1d over layers, the in-place ``x +=``), the README
call ``omninet(x, mask=mask)``, with a padded mask here; then a few regression steps with Adam.
Changed: the full attention's (b, i, j) mask is repeated per head; upstream broadcasts it
against (b h) rows, which works at the README's batch size 1 only (batch 2 here).
Standalone SelfAttention layers are never redrawn by 1.1.4: the projections stay fixed.
Shrunk: dim 512 -> 16, depth 6 -> 3, heads 8 -> 2, dim_head 64 -> 8, length 1024 -> 10, float64.
"""
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import einsum, nn

from common import changed, same_results


def exists(val):
    return val is not None


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, *, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x, mask=None):
        h = self.heads
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> (b h) n d", h=h), (q, k, v))
        sim = einsum("b i d, b j d -> b i j", q, k) * self.scale
        if exists(mask):
            max_neg_value = -torch.finfo(sim.dtype).max
            mask = rearrange(mask, "b i -> b i ()") * rearrange(mask, "b j -> b () j")
            mask = repeat(mask, "b i j -> (b h) i j", h=h)  # upstream broadcasts b against (b h); b = 1 there
            sim.masked_fill_(~mask, max_neg_value)
        attn = sim.softmax(dim=-1)
        out = einsum("b i j, b j d -> b i d", attn, v)
        return self.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=h))


class Omninet(nn.Module):
    def __init__(self, lib, *, dim, depth, dim_head=64, heads=8, pool_layer_tokens_every=2, attn_dropout=0.0, ff_dropout=0.0):
        super().__init__()
        PerformerAttention = lib.module.SelfAttention
        layers = nn.ModuleList([])
        for ind in range(depth):
            num_layers = ind + 1
            should_pool = num_layers % pool_layer_tokens_every
            layers.append(nn.ModuleList([
                PreNorm(dim, Attention(dim=dim, dim_head=dim_head, heads=heads, dropout=attn_dropout)),
                PreNorm(dim, FeedForward(dim=dim, dropout=ff_dropout)),
                PerformerAttention(dim=dim, heads=heads, dim_head=dim_head) if should_pool else None,
            ]))
        self.layers = layers

    def forward(self, x, mask=None):
        hiddens = [x]
        for attn, ff, efficient_attn in self.layers:
            x = attn(x, mask=mask) + x
            x = ff(x) + x
            hiddens.append(x)
            if exists(efficient_attn):
                num_layers = len(hiddens)
                all_tokens = rearrange(torch.stack(hiddens), "l b n d -> b (n l) d")
                pool_attn_mask = None
                if exists(mask):
                    pool_attn_mask = repeat(mask, "b n -> b (n l)", l=num_layers)
                attended_tokens = efficient_attn(all_tokens, mask=pool_attn_mask)
                attended_tokens = rearrange(attended_tokens, "b n c -> b c n")
                pooled_tokens = F.max_pool1d(attended_tokens, kernel_size=num_layers, stride=num_layers)
                x += rearrange(pooled_tokens, "b c n -> b n c")
        return x


def program(lib, rec):
    torch.manual_seed(0)
    omninet = Omninet(lib, dim=16, depth=3, dim_head=8, heads=2, pool_layer_tokens_every=2, attn_dropout=0.1, ff_dropout=0.1).double()
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(omninet.parameters(), lr=1e-3)
    rec.projections("projections", omninet)
    for _ in range(3):
        x = torch.randn(2, 10, 16, dtype=torch.float64)
        mask = torch.arange(10)[None, :] < torch.tensor([[10], [7]])
        out = omninet(x, mask=mask)  # (1, 1024, 512) in the README
        loss = (out - x.flip(1)).square()[mask].mean()
        loss.backward()
        rec.log("out", out)
        rec.optimizer_step(optimizer, omninet)  # optimizer.step(); optimizer.zero_grad()


def test_omninet_performer_pooling_attention_as_performer_pytorch():
    theirs, _ = same_results(program)
    assert not changed(theirs.rec.entries["projections"]), "1.1.4 never redraws a standalone SelfAttention"
